"""A lab's shared store: `mlflow server` over a real PostgreSQL, several runs and a sweep at once."""

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import TINY, free_port, mlflow_server, runs_of, start_vitexp

pytestmark = pytest.mark.slow

EPOCHS = 2


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, or where Debian puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, with an empty `mlflow`
    database: its SQLAlchemy URL."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql://)
    except ImportError:
        pytest.fail("psycopg is missing: install the dev extra (pip install -e '.[dev]')")
    folder = Path(tempfile.mkdtemp(prefix="vitexp-pg-"))  # outside pytest's root-only folders
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = lambda *cmd: subprocess.run(as_owner(list(cmd)), check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--locale=C")
    options = f"-h 127.0.0.1 -p {port} -k {folder}"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_runs_and_a_sweep_at_once_into_a_server_on_postgresql(postgres, tmp_path):
    """Three runs and a two-job sweep (jobs side by side) write at once to `make server`'s
    setup over PostgreSQL: every run FINISHED, every epoch recorded once, the sweep grouped."""
    uri, client, _, stop = mlflow_server(tmp_path, backend_uri=postgres, workers=2)
    try:
        common = [*TINY, f"trainer.epochs={EPOCHS}", "tracking.experiment=lab", f"tracking.uri={uri}"]
        procs = [start_vitexp([*common, f"trainer.seed={seed}"], tmp_path) for seed in (1, 2, 3)]
        sweep = [
            "-m",
            "hydra/launcher=parallel",
            *common,
            "depth=1,2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
        procs.append(start_vitexp(sweep, tmp_path))
        for proc in procs:
            _, stderr = proc.communicate(timeout=900)
            assert proc.returncode == 0, stderr[-4000:]
        runs = runs_of(client, "lab")
        (parent,) = [r for r in runs if r.data.tags.get("vitexp.sweep") == "true"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        grouped = {parent.info.run_id, *(r.info.run_id for r in children)}
        singles = [r for r in runs if r.info.run_id not in grouped]
        assert parent.info.status == "FINISHED" and len(runs) == 6
        assert sorted(r.data.params["model.depth"] for r in children) == ["1", "2"]
        assert sorted(r.data.params["trainer.seed"] for r in singles) == ["1", "2", "3"]
        for run in [*children, *singles]:
            assert run.info.status == "FINISHED"
            for key in ("train_loss", "val_top1", "optimizer_step"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                assert steps == list(range(1, EPOCHS + 1)), key
            assert "test_top1" in run.data.metrics
    finally:
        stop()
