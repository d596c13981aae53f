"""A tracking server that goes away mid-run: the run goes on and its record ends whole."""

import shlex

import pytest
from conftest import TINY, run_vitexp, runs_of, start_vitexp

pytestmark = pytest.mark.slow

EPOCHS = 3
# ~80 steps an epoch, so that the server is stopped while epoch 2 trains
OUTAGE = [*TINY, "data.num_train=3072", f"trainer.epochs={EPOCHS}"]
ARTIFACTS = {
    "config/config.yaml",
    "model_summary.txt",
    "class_names.json",
    "curves.png",
    "checkpoints/best.keras",
    "checkpoints/last.keras",
}


def read_until(stream, text: str, proc) -> None:
    """Reads the run's stdout or stderr until a line holds `text`."""
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"the run ended ({proc.wait()}) before printing {text!r}")


def artifact_paths(client, run_id: str, folder: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, folder or None):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def check_recorded_once(client, run) -> None:
    """FINISHED, every epoch's metrics once, its params, its artifacts, the test scores once."""
    run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_top1", "lr", "optimizer_step"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), key
    for key in ("test_top1", "best_val_top1"):
        assert len(client.get_metric_history(run_id, key)) == 1, key
    assert run.data.params["trainer.epochs"] == str(EPOCHS) and "replicas" in run.data.params
    assert ARTIFACTS <= artifact_paths(client, run_id)


def test_a_sweep_goes_on_through_a_server_outage(server, tmp_path):  # noqa: F811
    """The server stops in epoch 2 of the first job and comes back while that job waits at
    its end: both jobs and the sweep's parent end FINISHED, every record sent once."""
    uri, client, start, stop = server
    proc = start_vitexp(
        [
            "-m",
            *OUTAGE,
            "trainer.seed=1,2",
            "tracking.experiment=outage-sweep",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    read_until(proc.stdout, f"Epoch 2/{EPOCHS}", proc)
    stop()
    read_until(proc.stderr, "waiting up to", proc)  # trained through the outage; records kept
    start()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "is back" in stderr
    runs = runs_of(client, "outage-sweep")
    (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["trainer.seed"] for r in children) == ["1", "2"]
    for child in children:
        check_recorded_once(client, child)


def test_a_run_that_outlives_the_server_says_how_to_record_it(server, tmp_path):  # noqa: F811
    """The server stops in epoch 2 and stays down: training ends, the checkpoints stay, the
    last line gives the command that records the rest once the server is back, and it does."""
    uri, client, start, stop = server
    run_dir = tmp_path / "run"
    args = [
        *OUTAGE,
        "tracking.experiment=outage-run",
        "tracking.reconnect_s=1",
        f"tracking.uri={uri}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = start_vitexp(args, tmp_path)
    read_until(proc.stdout, f"Epoch 2/{EPOCHS}", proc)
    stop()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: error: tracking store") and "still unreachable" in last, last
    assert f"checkpoints are in {run_dir / 'checkpoints'}" in last, last
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {f"epoch_{EPOCHS:04d}.keras", "best.keras", "last.keras"} <= checkpoints
    start()
    command = shlex.split(last.split("record the rest with: ", 1)[1])
    assert command[:3] == ["python", "-m", "vitexp"] and command[-1] == "resume=true"
    run_vitexp(command[3:], tmp_path)
    (run,) = runs_of(client, "outage-run")
    check_recorded_once(client, run)
