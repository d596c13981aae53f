"""Concurrent runs lose nothing: many processes at once on a new sqlite store or one server."""

import multiprocessing

import pytest
from conftest import TINY, runs_of, start_vitexp

pytestmark = pytest.mark.slow

EPOCHS = 2
WRITERS = 8
WRITER_STEPS = 20


def write_run(uri: str, writer: int) -> None:
    """One writer: vitexp's own tracker as a training job uses it (a run, params, a metric per
    step, the end), without TensorFlow, so eight of them fit on two cores at once."""
    from vitexp.tracking import Tracker

    tracker = Tracker(uri, "writers")
    run_id = tracker.start_run(f"writer-{writer}", tags={"writer": str(writer)})
    tracker.log_params(run_id, {"writer": str(writer)})
    for step in range(1, WRITER_STEPS + 1):
        tracker.log_metrics(run_id, {"value": float(step), "writer": float(writer)}, step=step)
    assert tracker.flush()
    tracker.end_run(run_id)


def test_four_runs_started_at_once_on_a_new_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [
        start_vitexp([*TINY, f"trainer.epochs={EPOCHS}", f"tracking.uri={uri}"], tmp_path) for _ in range(4)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = runs_of(client)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        for key in ("train_loss", "val_top1", "optimizer_step"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), key
    folders = [tmp_path / r.data.tags["vitexp.output_dir"] for r in runs]
    # a folder per run, named <time>-<pid> after the process that wrote it
    assert sorted(int(f.name.rsplit("-", 1)[1]) for f in folders) == sorted(p.pid for p in procs)
    for folder in folders:
        assert sorted(p.name for p in (folder / "checkpoints").glob("epoch_*.json")) == [
            f"epoch_{e:04d}.json" for e in range(1, EPOCHS + 1)
        ]


@pytest.mark.parametrize("backend", ["new_sqlite_store", "mlflow_server"])
def test_eight_writers_at_once_lose_nothing(backend, request, tmp_path):
    from mlflow.tracking import MlflowClient

    if backend == "mlflow_server":
        uri = request.getfixturevalue("server")[0]
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # created by whichever writer comes first
    import vitexp.tracking  # noqa: F401  (imported once; the forked writers share it)

    fork = multiprocessing.get_context("fork")  # eight processes without eight imports of MLflow
    procs = [fork.Process(target=write_run, args=(uri, i)) for i in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    client = MlflowClient(uri)
    runs = runs_of(client, "writers")
    assert len(runs) == WRITERS and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "value"))
        assert history == [(s, float(s)) for s in range(1, WRITER_STEPS + 1)]  # each step once
        assert run.data.metrics["writer"] == float(run.data.tags["writer"])
