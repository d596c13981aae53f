"""A tracking server that goes away mid-run: the run goes on and its record ends whole."""

import contextlib
import os
import re
import shlex
import signal
import threading
from pathlib import Path

import pytest
from conftest import TINY, mlflow_server, run_vitexp, runs_of, start_vitexp, wait_for

from vitexp.tracking import Tracker

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


def server_processes() -> list[int]:
    """This test process's descendants that run MLflow's server (the server and its workers)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        todo += children
    return [p for p in found if b"mlflow" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_ctrl_c_whose_killed_status_waits_on_a_silent_server_says_so(tmp_path, capfd):
    """The user is told why a Ctrl-C has not stopped the run yet, and how to stop it now; a
    store that answers adds no line."""
    uri, client, _, stop = mlflow_server(tmp_path)
    try:
        tracker = Tracker(uri, "silent")
        notice = "the tracking store has not answered for 1 s"
        quick = tracker.start_run("quick", {})
        with pytest.raises(KeyboardInterrupt), tracker.run(quick):
            raise KeyboardInterrupt
        assert notice not in capfd.readouterr().err
        slow = tracker.start_run("slow", {})
        frozen = server_processes()
        assert frozen, "no server process found to stop"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        thaw = threading.Timer(2.5, lambda: [os.kill(pid, signal.SIGCONT) for pid in frozen])
        thaw.start()
        with pytest.raises(KeyboardInterrupt), tracker.run(slow):
            raise KeyboardInterrupt
        thaw.join()
        err = capfd.readouterr().err
        assert f"vitexp: marking run {slow} KILLED: {notice}" in err, err
        assert "press Ctrl-C again to stop now" in err
        assert [client.get_run(r).info.status for r in (quick, slow)] == ["KILLED", "KILLED"]
    finally:
        stop()


def test_ctrl_c_with_a_silent_server_says_so_and_the_last_line_tells_the_truth(tmp_path, monkeypatch):
    """Ctrl-C while the server does not answer: each wait on it says why the run has not
    stopped yet, and the last line says the run stays RUNNING there, not KILLED."""
    from mlflow.tracking import MlflowClient

    uri, _, _, stop = mlflow_server(tmp_path)
    run_dir = tmp_path / "run"
    frozen = []
    try:
        with monkeypatch.context() as run_env:  # the run's wait on each store call, not this test's
            run_env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
            proc = start_vitexp([*OUTAGE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
        wait_for(lambda: (run_dir / "model_summary.txt").exists(), proc)  # training
        frozen = server_processes()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stderr[-4000:]
        assert "the tracking store has not answered for 1 s (a server gets up to 3 s)" in stderr, stderr[
            -3000:
        ]
        last = stderr.strip().splitlines()[-1]
        assert re.search(
            r"stays RUNNING in the tracking store \(it did not take the last \d+ records\)", last
        ), last
        assert "is KILLED" not in last and "start it again with:" in last, last
        # what the store holds as the command ends, read from the server's own database while
        # the server is still stopped: on waking, a loaded server may take minutes to answer
        (run,) = runs_of(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
        assert run.info.status == "RUNNING"  # as the last line said
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        stop()
