"""What a run records in MLflow, read back from a real sqlite store, and what the tools read."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_vitexp, runs_of
from PIL import Image

# Folder names a user's own data may have: commas, quotes, non-ASCII, spaces (sorted order).
CLASSES = ["a b", "bags, purses", "café, crème", 'say "hi"']
SHAPE = [16, 16, 3]

# the tests of the module's run go to one worker: it is trained once, not once a worker
FOLDER_RUN = pytest.mark.xdist_group("folder_run")


def write_image_folder(root: Path, per_class: int = 10) -> list[Path]:
    """PNGs in every colour mode a user's folder may hold, 24x20, one colour per class."""
    rng = np.random.default_rng(0)
    paths = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        colour = np.array([60 * c + 30, 200 - 50 * c, 40 + 70 * (c % 2)], dtype=np.float64)
        for i in range(per_class):
            rgb = np.clip(colour + rng.normal(0, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
            mode = i % 5
            if mode == 0:
                image = Image.fromarray(rgb)
            elif mode == 1:
                image = Image.fromarray(rgb).convert("L")
            elif mode == 2:
                image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
            elif mode == 3:
                image = Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)]))
            else:
                grey = (np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257).astype(np.uint16)
                image = Image.fromarray(grey)
            path = root / name / f"img_{i:02d}.png"
            image.save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One run on an image folder with awkward class names, early stopping and a profile."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("folder_run")
    files = write_image_folder(tmp / "images")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [o for o in TINY if not o.startswith(("data=", "trainer.epochs"))]
    run_vitexp(
        [
            *overrides,
            "tracking.log_model=true",
            "data=image_folder",
            f"data.path={tmp / 'images'}",
            "data.num_classes=4",
            f"data.image_shape=[{','.join(map(str, SHAPE))}]",
            "trainer.batch_size=8",
            "trainer.epochs=5",
            "trainer.early_stopping.patience=2",
            "trainer.early_stopping.min_delta=10",  # nothing improves by 10 after epoch 1
            "trainer.profile=true",
            "trainer.profile_steps=[2,3]",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp / 'run'}",
        ],
        tmp,
        env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    client = MlflowClient(uri)
    (run,) = runs_of(client)
    return uri, client, run, files, tmp


@pytest.mark.slow
@FOLDER_RUN
def test_class_names_with_commas_quotes_and_accents_reach_predict_intact(folder_run):
    uri, client, run, files, tmp = folder_run
    proc = run_vitexp(
        ["--tracking-uri", uri, "--json", "--top", "4", run.info.run_id, *map(str, files[::7])],
        tmp,
        module="vitexp.predict",
    )
    for image in json.loads(proc.stdout):
        assert [item["label"] for item in image["top"]] != []
        for item in image["top"]:
            assert item["label"] == CLASSES[item["class"]], item
        assert sorted(item["label"] for item in image["top"]) == CLASSES


@pytest.mark.slow
@FOLDER_RUN
def test_test_metrics_are_those_of_the_checkpoint_evaluate_uses(folder_run, capsys):
    from vitexp.tools import evaluate

    uri, client, run, _, tmp = folder_run
    metrics = run.data.metrics
    assert run.data.params["trainer.test_checkpoint"] == "best"
    assert metrics["test_epoch"] == metrics["best_epoch"]
    evaluate.main(["--tracking-uri", uri, "--in-place", run.info.run_id])
    assert "(best checkpoint)" in capsys.readouterr().out
    evaluated = client.get_run(run.info.run_id).data.metrics
    assert evaluated["eval_top1"] == metrics["test_top1"]
    assert evaluated["eval_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


@pytest.mark.slow
@FOLDER_RUN
def test_early_stop_and_profile_are_recorded(folder_run):
    _, client, run, _, tmp = folder_run
    # epoch 1 sets the best; epochs 2 and 3 cannot beat it by 10: stop after epoch 3 of 5
    assert run.data.metrics["stopped_epoch"] == 3 and run.data.tags["vitexp.stopped_early"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2, 3]
    profile = Path(client.download_artifacts(run.info.run_id, "profile", str(tmp / "profile")))
    assert list(profile.rglob("*.xplane.pb")), "no profiler trace in the profile/ artifact"


@pytest.mark.slow
@FOLDER_RUN
def test_run_carries_system_metrics_datasets_source_tags_and_a_model(folder_run):
    import mlflow

    uri, client, run, files, tmp = folder_run
    keys = set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    inputs = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation", "test"}
    for context, param in (
        ("training", "train_images"),
        ("validation", "val_images"),
        ("test", "test_images"),
    ):
        dataset = inputs[context]
        assert dataset.name == "image_folder" and str(tmp / "images") in dataset.source
        assert json.loads(dataset.profile)["num_rows"] == int(run.data.params[param]) and dataset.digest
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "image_folder" in run.info.run_name

    mlflow.set_tracking_uri(uri)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    assert model.metadata.signature is not None
    from vitexp.tools.runs import read_images

    out = model.predict(read_images([str(p) for p in files[::9]], SHAPE))
    assert all(label == CLASSES[c] for c, label in zip(out["class"], out["label"]))


@pytest.mark.slow
@FOLDER_RUN
def test_predict_reads_files_as_training_did(folder_run):
    """Grey, palette, alpha and 16-bit PNGs of 24x20 give predict the training tensors."""
    uri, _, run, files, tmp = folder_run
    from vitexp.data.folder import _read
    from vitexp.tools.runs import load_run, read_images

    trained, _ = _read(tmp / "images", SHAPE, CLASSES)  # class by class, files by name
    read = read_images([str(p) for p in files], SHAPE)
    np.testing.assert_array_equal(read, trained)
    model = load_run(run.info.run_id, uri).model
    np.testing.assert_array_equal(model.predict(read, verbose=0), model.predict(trained, verbose=0))


def test_early_stopping_counts_from_the_checkpoints_after_a_resume(tmp_path):
    from vitexp.train.callbacks import CheckpointDir, EarlyStopping, epochs_since_best

    history = {1: {"val_loss": 1.0}, 2: {"val_loss": 0.5}, 3: {"val_loss": 0.6}, 4: {"val_loss": 0.55}}
    assert epochs_since_best(history, "val_loss", 0.0) == 2
    assert epochs_since_best(history, "val_loss", 0.2) == 2
    assert epochs_since_best({1: {"val_top1": 0.2}, 2: {"val_top1": 0.3}}, "val_top1", 0.0) == 0
    assert epochs_since_best({1: {"val_top1": 0.2}, 2: {"val_top1": 0.3}}, "val_top1", 0.5) == 1
    checkpoints = CheckpointDir(tmp_path)
    for epoch, metrics in history.items():
        checkpoints.metrics_file(epoch).write_text(json.dumps(metrics))
        checkpoints.model_file(epoch).write_bytes(b"")
    # a fresh callback, as after a resume, knows what the interrupted process counted
    assert EarlyStopping(checkpoints, patience=2, monitor="val_loss").should_stop()
    assert not EarlyStopping(checkpoints, patience=3, monitor="val_loss").should_stop()
    assert math.isfinite(epochs_since_best({}, "val_loss", 0.0))


def test_class_names_travel_as_json_and_old_runs_still_read(shared_store):
    from vitexp.tracking import Tracker

    uri, client = shared_store
    tracker = Tracker(uri, "names")
    new = tracker.start_run("new", {})
    tracker.log_class_names(new, CLASSES)
    old = tracker.start_run("old", {})
    tracker.log_params(old, {"class_names": "cat,dog"})
    assert tracker.class_names(tracker.get_run(new), 4) == CLASSES
    assert tracker.class_names(tracker.get_run(old), 2) == ["cat", "dog"]
    assert tracker.class_names(tracker.get_run(old), 3) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "argv0, program",
    [("/home/u/.venv/bin/vitexp", "vitexp"), ("/src/vitexp/__main__.py", "python -m vitexp")],
)
def test_command_line_is_what_the_user_typed(argv0, program, monkeypatch):
    import sys

    from vitexp.provenance import command_line

    monkeypatch.setattr(sys, "argv", [argv0, "data=image_folder", "data.path=/my photos", "resume=abc"])
    assert command_line() == f"{program} data=image_folder 'data.path=/my photos' resume=abc"
    assert command_line(resume=True) == f"{program} data=image_folder 'data.path=/my photos' resume=true"


def test_summary_names_a_ui_command_that_works_anywhere(tmp_path, capsys):
    from omegaconf import OmegaConf

    from vitexp.tracking import Tracker
    from vitexp.train.record import print_summary

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "summary")
    run_id = tracker.start_run("r", {})
    scores = {"top1": 0.5, "top5": 0.9, "loss": 1.2}
    result = {"test": scores, "tested_val": scores, "best_val_top1": 0.5, "best_epoch": 2}
    result["checkpoint"] = "best"
    cfg = OmegaConf.create({"run_name": "r", "trainer": {"tta": "none", "test_checkpoint": "best"}})
    print_summary(cfg, tracker, run_id, result)
    out = capsys.readouterr().out
    assert "make ui" not in out and f"open the UI with: mlflow ui --backend-store-uri {uri}\n" in out


# The Tracker's own API, in-process on a real sqlite store: no training, seconds in all.


def status_of(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_run_context_ends_finished_failed_or_killed(shared_store):
    from vitexp.tracking import Tracker
    from vitexp.train.preempt import Terminated

    uri, client = shared_store
    tracker = Tracker(uri, "ends")
    done, broken, stopped, told = (tracker.start_run(n, {}) for n in ("done", "broken", "stopped", "told"))
    with tracker.run(done) as run_id:
        tracker.log_metrics(run_id, {"loss": 1.0}, step=1)
    with pytest.raises(ValueError), tracker.run(broken):
        raise ValueError("bad input")
    with pytest.raises(Terminated), tracker.run(stopped):  # SIGTERM, as vitexp.train.preempt raises it
        raise Terminated()
    with pytest.raises(KeyError), tracker.run(told, error_text=lambda err: "one line"):
        raise KeyError("x")
    assert [status_of(client, r) for r in (done, broken, stopped, told)] == [
        "FINISHED",
        "FAILED",
        "KILLED",
        "FAILED",
    ]
    assert client.get_run(broken).data.tags["vitexp.error"] == "ValueError: bad input"
    assert client.get_run(told).data.tags["vitexp.error"] == "one line"
    assert "vitexp.error" not in client.get_run(stopped).data.tags
    assert client.get_run(done).data.metrics == {"loss": 1.0}


def test_an_interrupt_inside_a_store_write_still_ends_the_run_killed(shared_store):
    """Ctrl-C or SIGTERM can land while a write holds the store's lock: the interrupted frames
    are let go first, so closing the run does not find the database locked."""
    import sqlite3

    from vitexp.tracking import Tracker

    uri, client = shared_store
    tracker = Tracker(uri, "interrupted-write")
    run_id = tracker.start_run("r", {})

    def interrupted_write():
        db = sqlite3.connect(uri.removeprefix("sqlite:///"))
        db.execute("BEGIN EXCLUSIVE")  # the lock a metric write's transaction holds
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), tracker.run(run_id):
        interrupted_write()
    assert status_of(client, run_id) == "KILLED"


def test_a_killed_run_is_reopened_running(shared_store):
    from vitexp.tracking import KILLED, Tracker

    uri, client = shared_store
    tracker = Tracker(uri, "reopen")
    run_id = tracker.start_run("r", {})
    tracker.end_run(run_id, KILLED)
    tracker.reopen(run_id)
    assert status_of(client, run_id) == "RUNNING"
    assert tracker.get_run(run_id).id == run_id and tracker.get_run("no-such-run") is None


def test_metric_history_is_in_step_order(shared_store):
    from vitexp.tracking import Tracker

    uri, _ = shared_store
    tracker = Tracker(uri, "history")
    run_id = tracker.start_run("r", {})
    for step, value in ((3, 0.3), (1, 0.1), (2, 0.2)):
        tracker.log_metrics(run_id, {"val_top1": value}, step=step)
    assert tracker.metric_history(run_id, "val_top1") == {1: 0.1, 2: 0.2, 3: 0.3}
    assert list(tracker.metric_history(run_id, "val_top1")) == [1, 2, 3]
    assert tracker.metric_history(run_id, "never_logged") == {}


def test_unfinished_and_finished_runs_of_a_config(shared_store):
    from vitexp.tracking import FAILED, FINISHED, KILLED, Tracker

    uri, _ = shared_store
    tracker = Tracker(uri, "configs")
    ids = {}
    for name, config, status in (
        ("old-killed", "aaa", KILLED),
        ("finished", "aaa", FINISHED),
        ("new-failed", "aaa", FAILED),
        ("other", "bbb", KILLED),
    ):
        ids[name] = tracker.start_run(name, {"vitexp.config_hash": config})
        tracker.end_run(ids[name], status)
    unfinished = tracker.unfinished_runs("aaa")
    assert {r.id for r in unfinished} == {ids["old-killed"], ids["new-failed"]}
    starts = [r.start_time for r in unfinished]
    assert starts == sorted(starts, reverse=True)  # newest first: the one to resume
    assert tracker.finished_run("aaa").id == ids["finished"]
    assert tracker.finished_run("bbb") is None


def test_run_id_or_experiment_name_lookup(shared_store):
    from vitexp.tools.registry import best_run
    from vitexp.tracking import Tracker

    uri, _ = shared_store
    tracker = Tracker(uri, "lookup")
    parent = tracker.start_run("sweep", {"vitexp.sweep": "true"})
    kids = [tracker.start_run(f"job{i}", {}, parent_id=parent) for i in range(2)]
    for kid, score in zip(kids, (0.2, 0.7)):
        tracker.log_metrics(kid, {"test_top1": score}, step=1)
        tracker.end_run(kid)
    run, children = tracker.runs_under(parent)
    assert run.id == parent and {c.id for c in children} == set(kids)
    run, runs = Tracker(uri).runs_under("lookup", best_first="test_top1")
    assert run is None and {r.id for r in runs} == {parent, *kids}
    assert runs[0].id == kids[1]
    with pytest.raises(ValueError, match="neither a run id nor an experiment name"):
        tracker.runs_under("nothing-by-this-name")
    # the registry's "best run" takes the same lookup: a sweep's best child, or the run itself
    assert best_run(tracker, parent, "test_top1").id == kids[1]
    assert best_run(tracker, kids[0], "test_top1").id == kids[0]


def test_resume_finds_the_interrupted_run_of_the_same_config(shared_store, tmp_path):
    from conftest import compose

    from vitexp.tracking import FINISHED, KILLED, Tracker
    from vitexp.train.callbacks import CheckpointDir
    from vitexp.train.resume import config_hash, find_resume
    from vitexp.validate import ConfigError

    uri, _ = shared_store
    cfg = compose([*TINY, f"tracking.uri={uri}", "tracking.experiment=resume", "resume=true"])
    tracker = Tracker.from_config(cfg.tracking)
    with pytest.raises(ConfigError, match="no interrupted run of this config"):
        find_resume(tracker, cfg)
    out_dir = tmp_path / "job"
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    checkpoints.folder.mkdir(parents=True)
    checkpoints.metrics_file(2).write_text("{}")
    checkpoints.model_file(2).write_bytes(b"")
    tags = {"vitexp.config_hash": config_hash(cfg), "vitexp.output_dir": str(out_dir)}
    killed = tracker.start_run("killed", tags)
    tracker.end_run(killed, KILLED)
    found = find_resume(tracker, cfg)
    assert (found.run_id, found.out_dir, found.epoch) == (killed, out_dir, 2)
    tracker.end_run(killed, FINISHED)
    cfg.resume = killed
    with pytest.raises(ConfigError, match="already FINISHED"):
        find_resume(tracker, cfg)
