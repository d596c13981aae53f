"""vitexp.compare on a real sqlite store filled through the Tracker, in-process: no training."""

import csv
import re

import numpy as np
import pytest

from vitexp.report.compare import compare, label, swept_params
from vitexp.tracking import FINISHED, Tracker


def trained(tracker: Tracker, name: str, depth: int, top1: float, parent=None, tags=None) -> str:
    """A run as a training job leaves it: params, two epochs of timings, final metrics."""
    run_id = tracker.start_run(name, tags or {}, parent_id=parent)
    params = {"model.depth": str(depth), "model.dim": "32", "num_params": str(1000 * depth)}
    tracker.log_params(run_id, {**params, "tracking.uri": "ignored", "run_name": name})
    for epoch, (seconds, speed) in enumerate(((2.0, 100.0), (1.0, 200.0)), start=1):
        tracker.log_metrics(run_id, {"epoch_time_s": seconds, "images_per_s": speed}, step=epoch)
    tracker.log_metrics(run_id, {"best_val_top1": top1 + 0.05, "test_top1": top1, "test_top5": 0.9}, step=2)
    tracker.end_run(run_id, FINISHED)
    return run_id


@pytest.fixture
def sweep(shared_store, request):
    """An experiment with a sweep of three depths and an evaluation run under its parent, and
    a lone run: (uri, client, experiment, parent, lone)."""
    uri, client = shared_store
    experiment = re.sub(r"\W+", "-", request.node.name)
    tracker = Tracker(uri, experiment)
    parent = tracker.start_run("sweep", {"vitexp.sweep": "true"})
    for depth, top1 in ((1, 0.3), (2, 0.6), (4, 0.5)):
        trained(tracker, f"depth{depth}", depth, top1, parent)
    trained(tracker, "evaluation", 2, 0.99, parent, {"vitexp.evaluates": "x"})
    lone = trained(tracker, "lone", 8, 0.1)
    return uri, client, experiment, parent, lone


def test_a_sweep_is_compared_best_first_and_the_table_logged_to_its_parent(sweep, tmp_path):
    uri, client, _, parent, _ = sweep
    header, rows, paths = compare(parent, uri, "test_top1", tmp_path / "out")
    assert header[:3] == ["run", "status", "model.depth"]  # only what differs is a column
    assert "model.dim" not in header and "tracking.uri" not in header
    col = {name: header.index(name) for name in header}
    assert [r[col["run"]] for r in rows] == ["depth2", "depth4", "depth1"]  # no evaluation run
    first = rows[0]
    assert first[col["epochs"]] == 2 and first[col["train_time_s"]] == 3.0
    assert first[col["images_per_s"]] == 150.0 and first[col["num_params"]] == 2000
    with open(tmp_path / "out" / "comparison.csv") as f:
        assert list(csv.reader(f))[1][0] == "depth2"
    # scores with 4 decimals, seconds and images/s as measured
    assert (
        "| depth2 | FINISHED | 2 | 2000 | 0.6500 | 0.6000 | 0.9000 | 2 | 3.0 | 150.0 |"
        in (tmp_path / "out" / "comparison.md").read_text()
    )
    assert {p.name for p in paths} == {
        "comparison.csv",
        "comparison.md",
        "comparison.png",
        "val_top1_curves.png",
    }
    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert logged == {f"comparison/{p.name}" for p in paths}


def test_an_experiment_is_compared_without_its_sweep_parents(sweep, tmp_path):
    uri, client, experiment, _, lone = sweep
    _, rows, _ = compare(experiment, uri, "best_val_top1", tmp_path / "out")
    assert [r[0] for r in rows] == ["depth2", "depth4", "depth1", "lone"]
    assert client.list_artifacts(lone) == []  # nothing is logged for an experiment


def test_pruned_trials_get_a_column(shared_store, tmp_path):
    uri, _ = shared_store
    tracker = Tracker(uri, "pruned")
    trained(tracker, "full", 1, 0.5)
    trained(tracker, "cut", 2, 0.2, tags={"vitexp.pruned_epoch": "1"})
    header, rows, _ = compare("pruned", uri, "test_top1", tmp_path / "out")
    assert header[-1] == "pruned_epoch" and [r[-1] for r in rows] == ["", "1"]


@pytest.mark.parametrize(
    "target, sort, message",
    [
        ("no-such-thing", "test_top1", "'no-such-thing' is neither a run id nor an experiment name"),
        (None, "test_top9", "--sort test_top9: no such column"),
    ],
)
def test_a_bad_target_or_column_is_one_clear_error(sweep, tmp_path, target, sort, message):
    uri, _, experiment, _, _ = sweep
    with pytest.raises(ValueError, match=message):
        compare(target or experiment, uri, sort, tmp_path / "out")


def test_an_empty_experiment_has_nothing_to_compare(shared_store, tmp_path):
    uri, _ = shared_store
    assert Tracker(uri, "empty").experiment_id  # created, no runs
    with pytest.raises(ValueError, match="no training runs under 'empty'"):
        compare("empty", uri, "test_top1", tmp_path / "out")


def test_several_targets_are_compared_in_one_table_that_names_their_experiments(
    sweep, shared_store, tmp_path
):
    uri, _, experiment, parent, lone = sweep
    other = Tracker(uri, f"{experiment}-other")
    trained(other, "elsewhere", 3, 0.7)
    said = []
    header, rows, _ = compare(
        [parent, lone, f"{experiment}-other"], uri, "test_top1", tmp_path / "o", said.append
    )
    assert [r[0] for r in rows] == ["elsewhere", "depth2", "depth4", "depth1", "lone"]
    assert header[:3] == ["run", "experiment", "status"] and rows[0][1] == f"{experiment}-other"
    (line,) = said
    assert line.startswith(f"read sweep sweep ({parent}) in experiment {experiment}, 3 runs; run lone")
    assert line.endswith(f"experiment {experiment}-other, 1 runs")


def test_without_a_target_every_experiment_is_read(sweep, tmp_path):
    uri, _, experiment, _, _ = sweep
    said = []
    _, rows, _ = compare([], uri, "test_top1", tmp_path / "o", said.append)
    assert said[0].startswith("read every experiment with training runs: ")
    assert f"experiment {experiment}, 4 runs" in said[0]
    assert {"depth1", "depth2", "depth4", "lone"} <= {r[0] for r in rows}


def test_runs_are_labelled_by_their_swept_values(sweep, shared_store):
    uri, client, experiment, parent, _ = sweep
    runs = [r for r in Tracker(uri, experiment).children(parent) if "vitexp.evaluates" not in r.tags]
    swept = swept_params(runs)
    assert swept == ["model.depth"]
    assert sorted(label(r, swept) for r in runs) == ["depth=1", "depth=2", "depth=4"]


def test_a_search_of_many_real_valued_trials_gets_readable_pictures(shared_store, tmp_path):
    """16 trials with learning rates as a sampler draws them: labels of 3 significant digits,
    and pictures drawn without a layout warning (each was one, with unreadable ticks)."""
    import warnings

    uri, _ = shared_store
    tracker = Tracker(uri, "many-trials")
    parent = tracker.start_run("search", {"vitexp.sweep": "true"})
    rng = np.random.default_rng(0)
    for trial in range(16):
        run_id = trained(tracker, f"trial{trial}", 2, 0.5 + trial / 100, parent)
        lr, wd = 10 ** rng.uniform(-3.5, -2), 10 ** rng.uniform(-2, -0.7)
        tracker.log_params(run_id, {"optimizer.learning_rate": repr(lr), "optimizer.weight_decay": repr(wd)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        header, rows, paths = compare(parent, uri, "best_val_top1", tmp_path / "out")
    assert header[2:4] == ["optimizer.learning_rate", "optimizer.weight_decay"]
    (run,) = [r for r in Tracker(uri, "many-trials").find_runs() if r.name == "trial15"]
    lr = float(run.params["optimizer.learning_rate"])
    assert len(run.params["optimizer.learning_rate"]) > 12  # as logged: every digit
    assert label(run, header[2:4]).startswith(f"learning_rate={lr:.3g} weight_decay=")
    assert len(label(run, header[2:4])) < 50
    assert all(p.stat().st_size > 10_000 for p in paths if p.suffix == ".png")


def test_the_command_ranks_by_validation_unless_told(shared_store, tmp_path, monkeypatch, capsys):
    """The best run on test is not the one to pick: the table leads with the best on validation."""
    from vitexp.tools.compare import main

    uri, _ = shared_store
    tracker = Tracker(uri, "val-first")
    for name, val, test in (("val-best", 0.9, 0.7), ("test-best", 0.8, 0.95), ("low", 0.6, 0.6)):
        run_id = tracker.start_run(name, {})
        tracker.log_params(run_id, {"num_params": "10", "model.depth": name})
        tracker.log_metrics(run_id, {"best_val_top1": val, "test_top1": test}, step=1)
        tracker.end_run(run_id, FINISHED)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def ranked(*argv):
        main(["val-first", "--out", str(tmp_path / "out"), *argv])
        lines = capsys.readouterr().out.splitlines()
        table = lines[lines.index(next(ln for ln in lines if ln.startswith("run "))) + 1 :]
        return [ln.split()[0] for ln in table[:3]]

    assert ranked() == ["val-best", "test-best", "low"]
    assert ranked("--sort", "test_top1") == ["test-best", "val-best", "low"]
