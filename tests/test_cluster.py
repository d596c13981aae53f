"""Beyond one machine: SIGTERM, a real one-node Slurm cluster, pre-emption."""

import signal

import pytest
from conftest import TINY, run_vitexp, runs_of, start_vitexp
from test_resilience import wait_for

pytestmark = pytest.mark.slow

EPOCHS = 2
LONG = [*TINY, "data.num_train=3072", f"trainer.epochs={EPOCHS}"]  # 77 steps an epoch
PER_EPOCH = -(-int(3072 * 0.8) // 32)


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_sigterm_in_the_first_epoch_ends_killed_and_resumes(tmp_path, store):
    uri, client = store
    run_dir = tmp_path / "run"
    args = [*LONG, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"]
    proc = start_vitexp(args, tmp_path)
    wait_for((run_dir / "model_summary.txt").exists, proc)  # the run exists, training starts
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vitexp: terminated (SIGTERM); run") and last.endswith("resume=true")
    (run,) = runs_of(client)
    assert run.info.status == "KILLED"
    assert not list((run_dir / "checkpoints").glob("epoch_*.keras"))  # stopped before epoch 1 ended
    result = run_vitexp([*args, "resume=true"], tmp_path)
    assert f"resuming run {run.info.run_id} after epoch 0" in result.stderr
    (again,) = runs_of(client)
    assert again.info.status == "FINISHED"
    steps = history(client, run.info.run_id, "optimizer_step")
    assert steps == [(e, float(PER_EPOCH * e)) for e in range(1, EPOCHS + 1)]  # each epoch once
