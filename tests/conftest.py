"""Shared helpers: compose the real config, a temporary MLflow store, a real subprocess."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
ARTIFACTS = ROOT / "test-artifacts"
ARTIFACTS.mkdir(exist_ok=True)  # what the browser tests keep: every test process may write first

# A model and data small enough that a whole run takes seconds on two CPU cores.
TINY = [
    "model=vit_tiny",
    "data=synthetic",
    "model.image_size=16",
    "model.projection_dim=32",
    "model.transformer_units=[64,32]",
    "depth=1",
    "trainer.epochs=3",
    "trainer.batch_size=32",
    "report.enabled=false",
    "tracking.log_model=false",  # the MLflow Model is tested where it is used
    # set, not `auto`: the same path on every machine (auto's choice: tests/test_devices.py)
    "trainer.precision=float32",
]


def compose(overrides=(), config_dir=None):
    from vitexp.config import compose as vitexp_compose

    return vitexp_compose(list(overrides), config_dir)


def run_vitexp(args, tmp_path, module="vitexp", timeout=600, check=True, env=None):
    """Runs `python -m vitexp ARGS` in `tmp_path`, as a user would, and returns the result."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def vitexp_in_process(tmp_path, monkeypatch, capsys):
    """`vitexp ARGS` run in this process through `vitexp.cli.main`, in `tmp_path`, for commands
    that end before training (a new TensorFlow process spends ~15 s starting): a function
    ARGS -> (exit status, stderr). What a job would set for the whole process is left alone
    (Hydra's logging set-up, which would close pytest's own handlers) or put back afterwards
    (the Keras precision policy, SIGTERM's handler)."""
    import hydra._internal.logging_config

    from vitexp import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "filter_native_noise", lambda: None)  # fd 2 stays pytest's
    monkeypatch.setattr(hydra._internal.logging_config, "configure_logging", lambda conf: None)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    keras = sys.modules.get("keras")
    policy = keras.mixed_precision.global_policy().name if keras else "float32"

    def run(args):
        monkeypatch.setattr(sys, "argv", ["vitexp", *args])
        with pytest.raises(SystemExit) as stop:
            cli.main()
        return stop.value.code, capsys.readouterr().err

    yield run
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy(policy)
    signal.signal(signal.SIGTERM, on_sigterm)


@pytest.fixture
def scratch_in_tmp_path(tmp_path, monkeypatch) -> Path:
    """The temporary files of code run in this process go in `tmp_path`: a job trained through
    `train(cfg)` outside Hydra keeps its run folder in a temporary one, left for its resume."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(autouse=True)
def default_precision():
    """Keras' default policy again after each test: an in-process run sets its own globally."""
    yield
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


def start_vitexp(args, cwd):
    """Starts `python -m vitexp ARGS` in the background, for tests that signal or race it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vitexp", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT and Python keeps an ignored SIGINT ignored;
        # give the run Ctrl-C as a terminal would, however the suite itself was started
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, *procs, timeout=300, poll=0.01, what=None):
    """The tests' one polling loop: polls `condition()` until it holds and returns its value;
    fails at once when one of `procs` (processes the wait depends on) ends first, with the end
    of its output, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"process ended ({proc.returncode}) before {what or 'the wait'}: {tail(proc)}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or 'the condition'}")
        time.sleep(poll)


def tail(proc) -> str:
    """The end of a process's output: its log file (`proc.log`) or its stderr pipe."""
    if getattr(proc, "log", None) is not None:
        return proc.log.read_text()[-5000:]
    return proc.stderr.read()[-3000:] if proc.stderr else ""


def answers(url: str) -> bool:
    """Whether an HTTP server answers `url`."""
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def chromium_flags(tmp_path) -> list[str]:
    """Headless Chromium that renders MLflow's charts and reaches nothing but 127.0.0.1."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=60000",
        "--window-size=1600,1000",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(folder, backend_uri=None, workers=1):
    """A real `mlflow server` on 127.0.0.1 over `backend_uri` (a sqlite file in `folder` by
    default), started: (uri, client, start, stop); `stop` stops it, `start` starts it again."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    procs = []

    def start():
        proc = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        wait_for(lambda: answers(f"{uri}/health"), proc, timeout=120, poll=0.5, what="the server")

    def stop():
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)

    start()
    return uri, MlflowClient(uri), start, stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend: (uri, client, start, stop)."""
    uri, client, start, stop = mlflow_server(tmp_path_factory.mktemp("server"))
    yield uri, client, start, stop
    stop()


# ----------------------------------------------------------------- a real one-node Slurm cluster
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
# what a job asks of the local cluster: no GPU, one core, a little memory
LOCAL_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=30",
]


@pytest.fixture(scope="session")
def slurm():
    """The one-node cluster of `make slurm-up`, started once for the session (its tests run
    on one process: xdist_group "slurm"); its job-completion log."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("Slurm is not installed: apt-get install -y slurm-wlm munge")
    was_up = subprocess.run([SCRIPT, "status"]).returncode == 0
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=150)
    assert up.returncode == 0, f"{SCRIPT} up failed: {up.stderr.strip()}"
    yield Path(os.environ.get("SLURM_LOCAL", "/var/lib/vitexp-slurm")) / "jobcomp.log"
    if not was_up:
        subprocess.run([SCRIPT, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An sqlite MLflow store with its tables and nothing else, made once: a new store spends
    seconds creating its tables (tens of seconds on a loaded machine)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """A fresh sqlite MLflow store in a temporary folder, a copy of the empty one: (uri, client)."""
    from mlflow.tracking import MlflowClient

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """One sqlite MLflow store for the in-process tests, each writing its own experiment:
    a new store spends seconds creating its tables. (uri, client)"""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def runs_of(client, experiment="vitexp"):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


def signal_at_step(step: int, signum: int):
    """A Keras callback that sends this process `signum` once the optimizer has made `step` steps."""
    import keras

    class SignalAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == step:
                os.kill(os.getpid(), signum)

    return SignalAtStep()
