"""Sweeps: parallel jobs into a real MLflow server, Optuna, resuming, comparing, the UI."""

import csv
import shutil
import signal
import subprocess

import pytest
from conftest import ARTIFACTS, TINY, chromium_flags, run_vitexp, runs_of, start_vitexp, wait_for

pytestmark = pytest.mark.slow

# the tests of the module's grid go to one worker: it is swept once, not once a worker
GRID = pytest.mark.xdist_group("grid")


def children_of(client, parent_id, experiment="vitexp"):
    return [r for r in runs_of(client, experiment) if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.fixture(scope="module")
def grid(server, tmp_path_factory):
    """A 2x2 grid run by the joblib launcher (2 jobs at a time) into the server."""
    uri, client, _, _ = server
    folder = tmp_path_factory.mktemp("grid")
    run_vitexp(
        [
            "-m",
            "hydra/launcher=parallel",
            *TINY,
            "trainer.epochs=1",
            "patch_size=2,4",
            "depth=1,2",
            "tracking.experiment=grid",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={folder / 'sweep'}",
        ],
        folder,
    )
    return client.get_experiment_by_name("grid")


@GRID
def test_parallel_grid_into_a_tracking_server(server, grid):
    uri, client, _, _ = server
    runs = runs_of(client, "grid")
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    children = children_of(client, parent.info.run_id, "grid")
    assert sorted((r.data.params["model.patch_size"], r.data.params["model.depth"]) for r in children) == [
        ("2", "1"),
        ("2", "2"),
        ("4", "1"),
        ("4", "2"),
    ]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_top1", "train_loss", "test_top1", "lr"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    names = ("comparison.csv", "comparison.md", "comparison.png", "val_top1_curves.png")
    assert artifacts == {f"comparison/{name}" for name in names}


def test_tracking_server_down_mid_run_loses_nothing(server, tmp_path):
    uri, client, start, stop = server
    run_dir = tmp_path / "run"
    proc = start_vitexp(
        [
            *TINY,
            "data.num_train=3072",
            "trainer.epochs=5",
            "tracking.experiment=outage",
            f"tracking.uri={uri}",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    checkpoints = run_dir / "checkpoints"
    wait_for((checkpoints / "epoch_0001.json").exists, proc, poll=0.2)
    stop()
    wait_for((checkpoints / "epoch_0003.json").exists, proc, poll=0.2)  # two epochs with the server down
    start()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "metrics kept" in stderr
    (run,) = runs_of(client, "outage")
    for key in ("val_top1", "train_loss", "optimizer_step"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4, 5]


def test_parallel_optuna_search_against_parameter_count_shares_one_study(tmp_path, store):
    """Two trials side by side (joblib), two objectives: top-1 up, size down (vitexp's sweeper;
    tests/test_search.py has the rest)."""
    import optuna

    uri, client = store
    run_vitexp(
        [
            "hparams_search=vit_optuna",
            "hydra/launcher=parallel",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            *[a for a in TINY if not a.startswith("depth=")],  # depth is searched
            "trainer.epochs=1",
            "hydra.sweeper.params=null",
            "depth=choice(1,2)",
            "hydra.sweeper.enqueue=[{depth:1},{depth:2}]",
            "hydra.sweeper.direction=[maximize,minimize]",
            "hydra.sweeper.objectives=[best_val_top1,num_params]",
            "hydra.sweeper.pruner.name=none",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    runs = runs_of(client)
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    trials = children_of(client, parent.info.run_id)
    assert len(trials) == 2 and parent.info.status == "FINISHED"
    study = optuna.load_study(
        study_name=parent.data.tags["vitexp.optuna_study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    # each job, in its own process, wrote to the one study
    jobs = {t.user_attrs["vitexp.job"] for t in study.trials}  # host:pid of each trial's job
    assert len(jobs) == 2 and not jobs & {t.user_attrs["vitexp.owner"] for t in study.trials}
    assert [t.user_attrs["epochs"] for t in study.trials] == [1, 1]
    sizes = sorted(t.values[1] for t in study.trials)
    assert sizes == sorted(float(t.data.params["num_params"]) for t in trials) and sizes[0] < sizes[1]
    assert {t.values[0] for t in study.trials} == {t.data.metrics["best_val_top1"] for t in trials}
    pictures = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/pareto_front.png", "search/optimization_history.png", "search/trials.csv"} <= pictures
    # the front in words: the smaller model is on it, the bigger one only if it scored higher
    small, big = sorted(study.trials, key=lambda t: t.values[1])
    front = {small.number} | ({big.number} if big.values[0] > small.values[0] else set())
    assert parent.data.tags["pareto.trials"] == ", ".join(map(str, sorted(front)))
    table = client.download_artifacts(parent.info.run_id, "search/trials.csv", str(tmp_path))
    rows = {int(r["number"]): r["pareto"] for r in csv.DictReader(open(table))}
    assert rows == {t.number: str(t.number in front) for t in study.trials}


def test_killed_sweep_resumes_without_repeating_jobs_and_compares(tmp_path, store):
    uri, client = store
    args = [
        "-m",
        *TINY,
        "trainer.epochs=2",
        "depth=1,2,3",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 's'}",
    ]
    proc = start_vitexp(args, tmp_path)
    wait_for(
        lambda: any(
            r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags for r in runs_of(client)
        ),
        proc,
        poll=0.5,
        what="a finished job",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [r for r in runs_of(client) if r.info.status == "FINISHED"]
    assert [r.data.params["model.depth"] for r in first] == ["1"]

    out = run_vitexp(args, tmp_path)
    assert "already FINISHED" in out.stderr
    runs = runs_of(client)
    links = [r for r in runs if "vitexp.reused_run" in r.data.tags]
    trained = [r for r in runs if "model.depth" in r.data.params and r not in links]
    assert sorted(r.data.params["model.depth"] for r in trained) == ["1", "2", "3"]  # depth=1 not repeated
    assert all(r.info.status == "FINISHED" for r in trained)
    parents = sorted(
        (r for r in runs if r.data.tags.get("vitexp.sweep") == "true"), key=lambda r: r.info.start_time
    )
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]  # the killed one is closed too
    assert len(children_of(client, parents[-1].info.run_id)) == 3  # the resumed sweep holds all its jobs
    (link,) = links  # the earlier run keeps its place; the new sweep links to it
    assert link.data.tags["vitexp.reused_run"] == first[0].info.run_id
    assert link.data.tags["mlflow.parentRunId"] == parents[-1].info.run_id
    assert client.get_run(first[0].info.run_id).data.tags["mlflow.parentRunId"] == parents[0].info.run_id

    compared = run_vitexp(
        [parents[-1].info.run_id, "--out", str(tmp_path / "cmp"), "--tracking-uri", uri],
        tmp_path,
        module="vitexp.compare",
    )
    assert "model.depth" in compared.stdout
    rows = (tmp_path / "cmp" / "comparison.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("run,status,model.depth,num_params,best_val_top1")
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="install chromium (.ci/run does)")
@GRID
def test_mlflow_ui_lists_the_sweep_in_a_real_browser(server, grid, tmp_path):
    uri, client, _, _ = server
    runs = runs_of(client, "grid")
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    children = [r for r in runs if r is not parent]
    flags = chromium_flags(tmp_path)

    def page(url, shot, expected):
        """The rendered DOM once it shows every expected text (the UI loads runs after paint)."""
        for _ in range(6):
            dom = subprocess.run(
                ["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
            ).stdout
            if all(text in dom for text in expected):
                break
        (ARTIFACTS / shot).with_suffix(".html").write_text(dom)
        subprocess.run(
            ["chromium", *flags, f"--screenshot={ARTIFACTS / shot}", url], capture_output=True, timeout=180
        )
        return dom

    # the experiment's runs page lists the sweep as one parent holding its five runs
    runs_page = page(
        f"{uri}/#/experiments/{grid.experiment_id}/runs",
        "mlflow_ui_sweep_runs.png",
        [parent.info.run_name, f"<strong>{len(runs)}</strong> matching runs"],
    )
    assert parent.info.run_name in runs_page and f"<strong>{len(runs)}</strong> matching runs" in runs_page
    # the compare page puts the four jobs side by side
    ids = ",".join(f'"{r.info.run_id}"' for r in children)
    compare_page = page(
        f'{uri}/#/compare-runs?runs=[{ids}]&experiments=["{grid.experiment_id}"]',
        "mlflow_ui_sweep_compare.png",
        [r.info.run_name for r in children],
    )
    missing = {r.info.run_name for r in children if r.info.run_name not in compare_page}
    assert not missing, f"missing from the compare page: {missing}"
    for shot in ("mlflow_ui_sweep_runs.png", "mlflow_ui_sweep_compare.png"):
        assert (ARTIFACTS / shot).stat().st_size > 20_000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="install chromium (.ci/run does)")
@GRID
def test_mlflow_ui_opens_the_experiment_on_its_training_runs(server, grid, tmp_path):
    """vitexp's link opens the experiment on its runs table, not on MLflow's GenAI overview."""
    from vitexp.tracking import Tracker

    uri, client, _, _ = server
    assert grid.tags["mlflow.experimentKind"] == "custom_model_development"
    link = Tracker(uri, "grid").ui_link()
    runs = runs_of(client, "grid")
    flags = chromium_flags(tmp_path)
    expected = f"<strong>{len(runs)}</strong> matching runs"
    for _ in range(6):  # the UI loads the runs after its first paint
        dom = subprocess.run(
            ["chromium", *flags, "--dump-dom", link],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        if expected in dom:
            break
    (ARTIFACTS / "mlflow_ui_experiment_landing.html").write_text(dom)
    assert expected in dom and "Detect Issues" not in dom  # the GenAI overview's button
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    assert parent.info.run_name in dom and "Run Name" in dom  # the sweep, its jobs folded in
