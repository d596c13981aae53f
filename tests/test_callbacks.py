"""Callbacks: the EMA swap across a checkpoint and a restore."""

import keras
import numpy as np
import pytest

from vitexp.callbacks import SwapEMAWeights


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
