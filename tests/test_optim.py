"""The warmup-cosine schedule at the points that matter, in graph mode, and serialised."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vitexp.optim import WarmupCosine, adamw


def test_values_at_start_warmup_end_and_last_step():
    total = 625 * 30  # the textbook: 40,000 training images, batch 64, 30 epochs
    s = WarmupCosine(peak_lr=1e-3, total_steps=total, warmup_fraction=0.1)
    assert s.warmup_steps == 1875
    assert float(s(0)) == 0.0
    assert float(s(1875)) == pytest.approx(1e-3)
    assert float(s(1874)) == pytest.approx(1e-3 * 1874 / 1875, rel=1e-5)
    assert float(s(total - 1)) == pytest.approx(0.0, abs=1e-12)  # reaches 0 at the last step
    midway = 1875 + (total - 1 - 1875) / 2
    assert float(s(midway)) == pytest.approx(0.5e-3, rel=1e-4)


def test_no_warmup_and_final_floor():
    s = WarmupCosine(peak_lr=0.1, total_steps=101, warmup_fraction=0.0, final_lr=0.01)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(100)) == pytest.approx(0.01)
    assert float(s(1000)) == pytest.approx(0.01)
    constant = WarmupCosine(peak_lr=0.1, total_steps=10, warmup_fraction=0.0, final_lr=None)
    assert float(constant(7)) == pytest.approx(0.1)


def test_graph_safe_and_serialisable(tmp_path):
    s = WarmupCosine(peak_lr=1e-3, total_steps=100, warmup_fraction=0.2)
    graph_values = tf.function(lambda step: s(step))(tf.range(100))
    np.testing.assert_allclose(graph_values, [float(s(i)) for i in range(100)], rtol=1e-6)
    again = WarmupCosine.from_config(s.get_config())
    assert again.get_config() == s.get_config()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=adamw(s), loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.learning_rate.numpy() == pytest.approx(float(s(1)))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warmup_fraction"):
        WarmupCosine(1e-3, 100, warmup_fraction=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(1e-3, 0)
