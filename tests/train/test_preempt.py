"""Pre-emption inside an epoch: the job checkpoints the step it is at and the requeued job
goes on from that very step. In-process, through the real signal handler and `train`; a
Slurm batch job is what its environment says it is (test_cluster.py runs one for real)."""

import os
import shutil
import signal
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TINY, compose, runs_of, signal_at_step

from vitexp.data.pipeline import train_dataset
from vitexp.train.callbacks import CheckpointDir
from vitexp.train.preempt import Terminated
from vitexp.train.run import train

EPOCHS = 2
PER_EPOCH = 8  # 320 images, 256 of them trained on, batch 32
STOP_AT = PER_EPOCH + 3  # the optimizer step after which the job is pre-empted: epoch 2, step 3
ARGS = [
    *TINY,
    "data.num_train=320",
    f"trainer.epochs={EPOCHS}",
    "model.drop_path=0.2",  # random per step: the resumed steps must draw what they would have
    "optimizer.ema_momentum=0.9",  # averages kept in the optimizer across the stop
    "data.augment.random_crop_padding=2",
]


@pytest.fixture
def slurm_job(monkeypatch):
    """This process plays a Slurm batch job whose `scontrol` is out of reach; the signal
    handlers `train` installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    monkeypatch.setenv("SLURM_JOB_ID", f"{os.getpid()}7")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    yield monkeypatch
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def final_weights(run) -> list[np.ndarray]:
    path = Path(run.data.tags["vitexp.output_dir"]) / "checkpoints" / "last.keras"
    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).get_weights()]


@pytest.mark.usefixtures("scratch_in_tmp_path")
def test_preempted_inside_an_epoch_resumes_at_the_same_step(slurm_job, shared_store, capsys):
    uri, client = shared_store
    config = [*ARGS, f"tracking.uri={uri}"]
    with slurm_job.context() as outside:  # the same job, never stopped, outside Slurm
        outside.delenv("SLURM_JOB_ID")
        train(compose([*config, "tracking.experiment=preempt-whole"]))
    cfg = compose([*config, "tracking.experiment=preempt-cut"])
    with pytest.raises(Terminated):
        train(cfg, callbacks=(signal_at_step(STOP_AT, signal.SIGUSR2),))  # Slurm's time-limit warning
    (whole,) = runs_of(client, "preempt-whole")
    (cut,) = runs_of(client, "preempt-cut")
    folders = [Path(r.data.tags["vitexp.output_dir"]) for r in (whole, cut)]
    try:
        assert cut.info.status == "KILLED"
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"vitexp: terminated (SIGUSR2); run {cut.info.run_id} is KILLED at step 3 ")
        assert "of epoch 2 (checkpointed)" in last
        assert sorted(p.name for p in (folders[1] / "checkpoints").glob("step_*")) == [
            "step_0001_000003.json",
            "step_0001_000003.keras",
        ]
        slurm_job.setenv("SLURM_RESTART_COUNT", "1")  # Slurm starts the requeued job
        train(cfg)
        assert "resuming run" in capsys.readouterr().err  # the same run, not a new one
        (again,) = runs_of(client, "preempt-cut")
        assert again.info.status == "FINISHED" and again.data.tags["vitexp.slurm_restarts"] == "1"
        assert history(client, cut.info.run_id, "resumed_step") == [(2, float(STOP_AT))]
        for key in ("optimizer_step", "train_loss", "train_top1", "val_loss"):  # each epoch once
            assert history(client, cut.info.run_id, key) == history(client, whole.info.run_id, key), key
        assert history(client, cut.info.run_id, "optimizer_step") == [(1, PER_EPOCH), (2, 2 * PER_EPOCH)]
        for resumed, uninterrupted in zip(final_weights(again), final_weights(whole), strict=True):
            np.testing.assert_array_equal(resumed, uninterrupted)
        assert not list((folders[1] / "checkpoints").glob("step_*"))  # dropped at the epoch's end
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_resumed_epoch_skips_exactly_its_batches_done():
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    y = np.arange(10) % 3

    def first_pixels(first_epoch, skip=0):
        ds = train_dataset(x, y, 3, 4, seed=7, first_epoch=first_epoch, epochs=3, skip=skip)
        return [batch[0][:, 0, 0, 0].numpy().tolist() for batch in ds]

    full = first_pixels(0)  # 3 batches an epoch
    assert first_pixels(1, skip=2) == full[5:]


def test_the_step_checkpoint_is_the_newest_whole_one_after_the_last_epoch(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpoints = CheckpointDir(tmp_path)
    assert checkpoints.step_checkpoint() is None
    for step in (3, 5):
        checkpoints.commit_step(model, {"epoch": 0, "step": step})
    (tmp_path / "step_0000_000009.json").write_text("{}")  # cut off before its model file
    path, state = checkpoints.step_checkpoint()
    assert path.name == "step_0000_000005.keras" and state == {"epoch": 0, "step": 5}
    assert not (tmp_path / "step_0000_000003.keras").exists()  # one step checkpoint at a time
    checkpoints.commit(model, 1, {"val_top1": 0.5})  # the epoch ends: its step checkpoint is spent
    assert checkpoints.step_checkpoint() is None and not list(tmp_path.glob("step_*"))
