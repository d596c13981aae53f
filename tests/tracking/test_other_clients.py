"""Other MLflow clients on a run's store (the UI, a notebook): the run survives them."""

import subprocess
import sys

import pytest
from conftest import TINY, runs_of, start_vitexp

pytestmark = pytest.mark.slow

# A notebook's poller: MLflow imported and ready, it searches the store as soon as the run
# creates the file, so that both make a new store's tables at the same moment.
POLLER = """
import os, sys, time
import mlflow
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
path = sys.argv[1]
mlflow.set_tracking_uri(f"sqlite:///{path}")
print("ready", flush=True)
for _ in range(300_000):
    if os.path.exists(path):
        break
    time.sleep(0.001)
answers = 0
for _ in range(500):
    try:
        mlflow.search_runs(search_all_experiments=True)
        answers += 1
    except Exception as err:
        print("error:", str(err).splitlines()[0][:200], flush=True)
    if answers == 20:
        break
"""


@pytest.mark.parametrize("attempt", [1, 2])  # a race: more than one try to meet it
def test_a_run_survives_another_client_creating_its_new_store(attempt, tmp_path):
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert poller.stdout.readline().strip() == "ready"
    run = start_vitexp([*TINY, "trainer.epochs=1", f"tracking.uri=sqlite:///{path}"], tmp_path)
    _, stderr = run.communicate(timeout=600)
    poller.communicate(timeout=600)
    assert run.returncode == 0, stderr[-4000:]
    from mlflow.tracking import MlflowClient

    (finished,) = runs_of(MlflowClient(f"sqlite:///{path}"))
    assert finished.info.status == "FINISHED" and "val_top1" in finished.data.metrics
