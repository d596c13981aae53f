"""Callbacks: the EMA swap across a checkpoint and a restore; committed epochs' metrics."""

import json
import os
import signal
import time

import keras
import numpy as np
import pytest

from vitexp.train.callbacks import CheckpointDir, SwapEMAWeights, replay_missing
from vitexp.train.preempt import HELD_NOTICE, HELD_NOTICE_S, STOP


class SaveAfterFirstEpoch(keras.callbacks.Callback):
    """Saves the model as vitexp's checkpoints do: after the EMA swap of epoch 1's end."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.model.save(self.path)


def ema_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.AdamW(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    return model


@pytest.mark.parametrize("restored", [True, False])
def test_a_restored_ema_run_trains_on_from_the_raw_weights(restored, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    whole = ema_model()
    whole.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[SwapEMAWeights(), SaveAfterFirstEpoch(tmp_path / "epoch1.keras")],
    )
    again = keras.saving.load_model(tmp_path / "epoch1.keras")
    again.fit(
        x,
        y,
        epochs=2,
        initial_epoch=1,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[SwapEMAWeights(restored=restored)],
    )
    same = all(np.array_equal(a, b) for a, b in zip(whole.get_weights(), again.get_weights(), strict=True))
    assert same == restored  # without the swap back, training goes on from the averaged weights


def commit(checkpoints: CheckpointDir, epochs: dict[int, dict]) -> None:
    """Epochs committed as EpochRecorder commits them: metrics file first, then the model file."""
    checkpoints.folder.mkdir(parents=True, exist_ok=True)
    for epoch, metrics in epochs.items():
        checkpoints.metrics_file(epoch).write_text(json.dumps(metrics))
        checkpoints.model_file(epoch).write_bytes(b"")


def test_history_holds_every_committed_epoch_of_a_resumed_run(tmp_path):
    """The curves' data: the first process committed epochs 1-2, the resumed one epoch 3;
    epoch 4 was cut off between its metrics and its model file."""
    first = {1: {"train_loss": 2.0, "val_top1": 0.1}, 2: {"train_loss": 1.5, "val_top1": 0.3}}
    commit(CheckpointDir(tmp_path), first)
    resumed = CheckpointDir(tmp_path)
    commit(resumed, {3: {"train_loss": 1.0, "val_top1": 0.4}})
    resumed.metrics_file(4).write_text(json.dumps({"train_loss": 0.5, "val_top1": 0.9}))
    assert resumed.history(["train_loss", "val_top1", "val_top5"]) == {
        "train_loss": [2.0, 1.5, 1.0],
        "val_top1": [0.1, 0.3, 0.4],
        "val_top5": [],
    }


def test_replay_logs_only_the_committed_epochs_the_store_lacks(shared_store, tmp_path):
    from vitexp.tracking import Tracker

    uri, client = shared_store
    tracker = Tracker(uri, "replay")
    run_id = tracker.start_run("r", {})
    checkpoints = CheckpointDir(tmp_path)
    epochs = {e: {"optimizer_step": 10.0 * e, "val_top1": 0.1 * e} for e in (1, 2, 3)}
    commit(checkpoints, epochs)
    tracker.log_metrics(run_id, epochs[1], step=1)  # the kill came after epoch 2's commit
    assert replay_missing(tracker, run_id, checkpoints) == [2, 3]
    assert replay_missing(tracker, run_id, checkpoints) == []
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_top1"))
    assert steps == [1, 2, 3]


class CtrlCAfterSave:
    """A model whose save is followed by Ctrl-C: the signal lands between the epoch's file
    and the links to it, the moment a user's Ctrl-C most often hits a small model's commit."""

    def __init__(self, model):
        self.model = model

    def save(self, path):
        self.model.save(path)
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_a_commit_is_raised_once_last_and_best_are_linked(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it
    try:
        STOP.install()
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        checkpoints = CheckpointDir(tmp_path)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.commit(CtrlCAfterSave(model), 1, {"val_top1": 0.5})
        assert checkpoints.latest_epoch() == 1
        for name in ("last.keras", "best.keras"):
            assert os.path.samefile(tmp_path / name, checkpoints.model_file(1)), name
        STOP.handled()
        checkpoints.commit(model, 2, {"val_top1": 0.4})  # nothing pending: the next commit is plain
        assert os.path.samefile(checkpoints.last, checkpoints.model_file(2))
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_during_a_held_block_raises_at_once():
    """A store call holds Ctrl-C to its end, up to the store's timeout; a second one does not wait."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        STOP.install()
        with pytest.raises(KeyboardInterrupt):
            with STOP.held():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the first")  # held
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the second")  # never: the second raised
        assert reached == ["after the first"]
    finally:
        STOP.handled()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("wait_s, says", [(1.6, True), (0.2, False)])
def test_a_held_ctrl_c_that_waits_says_why(wait_s, says, capfd):
    """A user whose Ctrl-C waits on a slow store call is told why the run goes on, and how to
    stop now; a short hold (a checkpoint commit) adds no line."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        STOP.install()
        with pytest.raises(KeyboardInterrupt):
            with STOP.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(wait_s)  # the store call in progress
        time.sleep(HELD_NOTICE_S + 0.3)  # a notice not cancelled would come by now
        err = capfd.readouterr().err
        assert (HELD_NOTICE in err) is says, err
        assert err.count(HELD_NOTICE) <= 1
    finally:
        STOP.handled()
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_the_run_stops_on_the_first_raises_at_once():
    """After the first Ctrl-C the run writes its KILLED status; another one does not wait for
    that write (a store that does not answer holds it for up to its timeout)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        STOP.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the first: the run stops
        with pytest.raises(KeyboardInterrupt):
            with STOP.held():  # the run's KILLED status on its way to the store
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the second")  # never: it raised at once
        assert reached == []
    finally:
        STOP.handled()
        signal.signal(signal.SIGINT, previous)
