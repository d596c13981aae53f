"""The warmup-cosine schedule at the points that matter, in graph mode, and serialised."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import compose
from omegaconf import OmegaConf

from vitexp.optim.adamw import adamw as adamw_factory
from vitexp.optim.warmup_cosine import WarmupCosine


def adamw(learning_rate, **changes):
    """vitexp's AdamW with conf/optimizer/adamw.yaml's values, `changes` over them."""
    cfg = OmegaConf.to_container(compose(["optimizer=adamw"]).optimizer)
    values = {k: v for k, v in cfg.items() if k not in ("_target_", "_partial_", "learning_rate")}
    return adamw_factory(learning_rate, **{**values, **changes})


def test_values_at_start_warmup_end_and_last_step():
    total = 625 * 30  # the textbook: 40,000 training images, batch 64, 30 epochs
    s = WarmupCosine(peak_lr=1e-3, total_steps=total, warmup_fraction=0.1, warmup_lr=0.0, final_lr=0.0)
    assert s.warmup_steps == 1875
    assert float(s(0)) == 0.0
    assert float(s(1875)) == pytest.approx(1e-3)
    assert float(s(1874)) == pytest.approx(1e-3 * 1874 / 1875, rel=1e-5)
    assert float(s(total - 1)) == pytest.approx(0.0, abs=1e-12)  # reaches 0 at the last step
    midway = 1875 + (total - 1 - 1875) / 2
    assert float(s(midway)) == pytest.approx(0.5e-3, rel=1e-4)


def test_no_warmup_and_final_floor():
    s = WarmupCosine(peak_lr=0.1, total_steps=101, warmup_fraction=0.0, warmup_lr=0.0, final_lr=0.01)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(100)) == pytest.approx(0.01)
    assert float(s(1000)) == pytest.approx(0.01)
    constant = WarmupCosine(peak_lr=0.1, total_steps=10, warmup_fraction=0.0, warmup_lr=0.0, final_lr=None)
    assert float(constant(7)) == pytest.approx(0.1)


def test_graph_safe_and_serialisable(tmp_path):
    s = WarmupCosine(peak_lr=1e-3, total_steps=100, warmup_fraction=0.2, warmup_lr=0.0, final_lr=0.0)
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
        WarmupCosine(1e-3, 100, warmup_fraction=1.0, warmup_lr=0.0, final_lr=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(1e-3, 0, warmup_fraction=0.1, warmup_lr=0.0, final_lr=0.0)


def _train(optimizer, steps=5):
    """A few steps of `optimizer` on fixed weights and gradients; returns weights and moments."""
    rng = np.random.default_rng(1)
    variables = [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in [(7, 5), (5,), (3,)]]
    grads = [
        [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables] for _ in range(steps)
    ]
    optimizer.build(variables)

    @tf.function
    def step(g):
        optimizer.apply(g, variables)

    for g in grads:
        step(g)
    moments = [m.numpy() for m in optimizer._momentums + optimizer._velocities]
    return [v.numpy() for v in variables], moments


@pytest.mark.parametrize("schedule", [False, True])
def test_fused_adamw_matches_keras_adamw(schedule):
    def lr():
        return WarmupCosine(1e-2, 5, warmup_fraction=0.4, warmup_lr=0.0, final_lr=0.0) if schedule else 1e-2

    kwargs = dict(weight_decay=0.05, beta_1=0.8, beta_2=0.95)
    fused = adamw(lr(), **kwargs)
    assert type(fused) is not keras.optimizers.AdamW  # the fused subclass is what vitexp trains with
    weights, moments = _train(fused)
    ref_weights, ref_moments = _train(keras.optimizers.AdamW(lr(), **kwargs))
    for got, want in zip(weights + moments, ref_weights + ref_moments):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    start = [np.random.default_rng(1).normal(size=(7, 5)).astype("float32")]
    assert np.abs(weights[0] - start[0]).max() > 1e-3  # it did train


def test_fused_adamw_takes_keras_path_for_amsgrad_and_sparse_gradients():
    ams, ref = keras.optimizers.AdamW(1e-2, amsgrad=True), type(adamw(1e-2))(1e-2, amsgrad=True)
    np.testing.assert_allclose(_train(ref)[0][0], _train(ams)[0][0], rtol=1e-6)
    table = keras.Variable(np.ones((6, 2), "float32"))
    opt = adamw(0.1, weight_decay=0.0)
    opt.build([table])
    sparse = tf.IndexedSlices(tf.ones((1, 2)), tf.constant([3]), tf.constant([6, 2]))
    opt.apply([sparse], [table])
    changed = np.flatnonzero(np.abs(table.numpy() - 1).sum(axis=1) > 1e-6)
    assert changed.tolist() == [3]


def test_fused_adamw_reloads_from_a_checkpoint(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=adamw(1e-3, weight_decay=0.01), loss="mse")
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), verbose=0, epochs=2)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    np.testing.assert_allclose(loaded.optimizer._momentums[0].numpy(), model.optimizer._momentums[0].numpy())
