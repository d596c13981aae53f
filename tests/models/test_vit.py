"""The ViT: the textbook's exact size, checkpoints that reload, attention on demand."""

import keras
import numpy as np
import pytest
from conftest import compose
from hydra.utils import instantiate

from vitexp.models import adapt_input_norm, channel_stats, load_model
from vitexp.models.vit import attention_maps


def vit(option="vit", **kwargs):
    """The model of conf/model/<option>.yaml, with `kwargs` in place of its values."""
    return instantiate(compose([f"model={option}"]).model, _convert_="all", **kwargs)


def test_textbook_parameter_count():
    model = vit(num_classes=100, input_shape=(32, 32, 3))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 21_426_212
    assert model.count_params() == 21_426_219  # + the input statistics (3 + 3 + 1)


def small_vit(**kwargs):
    base = dict(
        num_classes=5,
        input_shape=(16, 16, 3),
        image_size=16,
        patch_size=4,
        depth=2,
        projection_dim=16,
        num_heads=2,
        transformer_units=[32, 16],
        head_units=[32],
    )
    return vit(**{**base, **kwargs})


def test_input_norm_is_adapted():
    images = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    model = small_vit()
    assert adapt_input_norm(model, images)
    mean, var = channel_stats(images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0))
    norm = model.get_layer("input_norm")
    out = np.asarray(norm(images.astype("float32")))
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-3)


def test_checkpoint_reloads_with_identical_outputs(tmp_path):
    model = small_vit(pooling="cls", pos_embedding="sincos", shifted_patches=True, locality_attention=True)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    adapt_input_norm(model, images)
    model.compile(optimizer="adamw", loss="mse")
    model.train_on_batch(images, np.zeros((4, 5)))
    model.save(tmp_path / "vit.keras")
    again = load_model(str(tmp_path / "vit.keras"))
    np.testing.assert_array_equal(model.predict(images, verbose=0), again.predict(images, verbose=0))


@pytest.mark.parametrize("pooling", ["cls", "gap", "flatten"])
def test_attention_maps(pooling):
    model = small_vit(pooling=pooling)
    images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    logits_before = model.predict(images, verbose=0)
    maps = attention_maps(model, images)
    tokens = 16 + (pooling == "cls")
    assert [m.shape for m in maps] == [(3, 2, tokens, tokens)] * 2
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, rtol=1e-5)
    # the first block's weights, by hand from the tokens the model itself feeds that block
    fed = keras.Model(model.input, model.get_layer("pos_embedding").output)(images)
    block = model.get_layer("block_0")
    x = np.asarray(block.norm1(fed))
    attention = block.attention
    q, k = (x @ np.asarray(d.kernel) + np.asarray(d.bias) for d in (attention.query, attention.key))
    q, k = (t.reshape(3, tokens, 2, 16).transpose(0, 2, 1, 3) for t in (q, k))  # (batch, head, token, dim)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(16)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(maps[0], expected / expected.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(logits_before, model.predict(images, verbose=0))  # the model is untouched
