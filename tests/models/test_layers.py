"""Each layer: output shapes, get_config round trip, and the maths it claims."""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from vitexp.models import layers
from vitexp.models.layers import (
    ClassToken,
    ConvTokenizer,
    Dropout,
    DropPath,
    MultiHeadSelfAttention,
    PatchTokenization,
    PositionEmbedding,
    TokenPooling,
    TransformerBlock,
    sincos_table,
)

RNG = np.random.default_rng(0)


def roundtrip(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    return clone


@pytest.mark.parametrize("shifted", [False, True])
def test_patch_tokenization(shifted):
    layer = PatchTokenization(patch_size=4, projection_dim=8, shifted=shifted)
    images = RNG.random((2, 16, 12, 3)).astype("float32")
    tokens, patches = layer(images)
    depth = 3 * (5 if shifted else 1)
    assert tokens.shape == (2, 12, 8)
    assert patches.shape == (2, 12, 16 * depth)
    patch = np.asarray(patches)[1, 4, :].reshape(4, 4, depth)[..., :3]
    # token 4 is row 1, column 1 of the 4x3 grid of 4x4 patches (row-major)
    np.testing.assert_allclose(patch, images[1, 4:8, 4:8, :])
    roundtrip(layer)


def test_patch_tokenization_rejects_indivisible_image():
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        PatchTokenization(5, 8)(np.zeros((1, 16, 16, 3), "float32"))


def test_sincos_matches_the_formula():
    table = sincos_table(50, 16)
    for pos, i in [(0, 0), (3, 2), (17, 5), (49, 7)]:
        assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
        assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


@pytest.mark.parametrize("kind, trainable", [("learned", 10 * 8), ("sincos", 0)])
def test_position_embedding(kind, trainable):
    layer = PositionEmbedding(kind)
    tokens = np.zeros((2, 10, 8), "float32")
    out = np.asarray(layer(tokens))
    assert out.shape == (2, 10, 8)
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == trainable
    if kind == "sincos":
        np.testing.assert_allclose(out[0], sincos_table(10, 8), atol=1e-6)
    assert roundtrip(layer).kind == kind


def test_class_token_and_pooling():
    tokens = RNG.random((3, 5, 4)).astype("float32")
    with_cls = ClassToken()(tokens)
    assert with_cls.shape == (3, 6, 4)
    assert TokenPooling("flatten")(tokens).shape == (3, 20)
    np.testing.assert_allclose(TokenPooling("cls")(tokens), tokens[:, 0])
    np.testing.assert_allclose(TokenPooling("gap")(tokens), tokens.mean(axis=1), rtol=1e-6)
    roundtrip(TokenPooling("gap"))


@pytest.mark.parametrize("locality", [False, True])
def test_attention_weights_are_distributions(locality):
    layer = MultiHeadSelfAttention(num_heads=2, key_dim=4, locality=locality)
    x = RNG.random((2, 6, 8)).astype("float32")
    out, weights = layer(x, return_attention=True)
    weights = np.asarray(weights)
    assert out.shape == (2, 6, 8) and weights.shape == (2, 2, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    if locality:  # a token never attends to itself
        assert np.diagonal(weights, axis1=-2, axis2=-1).max() < 1e-3
    np.testing.assert_allclose(layer(x), out, rtol=1e-6)
    roundtrip(layer)


# the textbook block's regularisation (conf/model/vit.yaml), which each test changes as it needs
BLOCK = dict(dropout=0.1, attention_dropout=0.1, drop_path=0.0, locality=False)


def test_transformer_block_param_count_and_dropout():
    block = TransformerBlock(num_heads=4, key_dim=64, mlp_units=[128, 64], **{**BLOCK, "dropout": 0.5})
    x = RNG.random((2, 144, 64)).astype("float32")
    assert block(x).shape == x.shape
    assert block.count_params() == 83_200  # the textbook's per-block count
    np.testing.assert_allclose(block(x), block(x))  # inference is deterministic
    assert not np.allclose(block(x, training=True), block(x, training=True))
    roundtrip(block)


def test_transformer_block_rejects_wrong_mlp_width():
    with pytest.raises(ValueError, match="make the last MLP width 8"):
        TransformerBlock(2, 4, mlp_units=[16, 4], **BLOCK)(np.zeros((1, 3, 8), "float32"))


def test_drop_path_drops_whole_samples():
    layer = DropPath(0.5)
    x = np.ones((64, 3, 2), "float32")
    out = np.asarray(layer(x, training=True))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    np.testing.assert_array_equal(layer(x), x)
    assert roundtrip(layer).rate == 0.5


def drop_mask(layer, n=256):
    return np.asarray(layer(np.ones((n, 1), "float32"), training=True))[:, 0] > 0


def test_every_block_draws_its_own_stochastic_depth():
    keras.utils.set_random_seed(7)
    blocks = [TransformerBlock(2, 4, [8, 8], **{**BLOCK, "drop_path": 0.5}) for _ in range(2)]
    for block in blocks:
        block.build((None, 3, 8))
    first, second = (drop_mask(block.path_drop) for block in blocks)
    assert (first != second).any()  # one step: the two blocks drop different samples


def test_drop_path_follows_the_run_seed():
    def masks(seed):
        keras.utils.set_random_seed(seed)
        layer = DropPath(0.5)
        return np.stack([drop_mask(layer) for _ in range(2)])

    np.testing.assert_array_equal(masks(3), masks(3))
    assert (masks(3) != masks(4)).any()
    keras.utils.set_random_seed(3)
    layer = DropPath(0.5)
    assert roundtrip(layer).seed == layer.seed


@pytest.mark.parametrize("layer_class", [DropPath, Dropout])
def test_a_reloaded_random_layer_continues_its_stream(layer_class, tmp_path):
    inputs = keras.Input((1,))
    layer = layer_class(0.5)
    model = keras.Model(inputs, layer(inputs))
    drop_mask(layer)  # one training step's draw
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(drop_mask(again.layers[-1]), drop_mask(layer))


# Where a `.keras` file keeps a block's weights (locality attention, MLP [16, 8]): the
# attributes holding each sublayer, as checkpoints of earlier versions were written.
BLOCK_WEIGHTS = {
    "attention/vars/0",  # the learned temperature
    *(f"attention/{d}/vars/{v}" for d in ("query", "key", "value", "output_dense") for v in (0, 1)),
    *(f"{n}/vars/{v}" for n in ("norm1", "norm2") for v in (0, 1)),
    *(f"mlp/{c}/dense/vars/{v}" for c in ("container", "container_1") for v in (0, 1)),
    *(f"{n}/vars/seed_state" for n in ("attention/attention_dropout", "path_drop")),
    *(f"mlp/{c}/dropout/vars/seed_state" for c in ("container", "container_1")),
}


def test_layers_reload_inside_a_model(tmp_path):
    inputs = keras.Input((8, 8, 3))
    tokens, _ = PatchTokenization(4, 8, shifted=True)(inputs)
    x = PositionEmbedding("learned")(ClassToken()(tokens))
    x = TransformerBlock(2, 4, [16, 8], **{**BLOCK, "locality": True, "drop_path": 0.1})(x)
    model = keras.Model(inputs, TokenPooling("cls")(x))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    images = RNG.random((2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(model(images), again(images))
    # the names older checkpoints were saved under: classes as `vitexp>Name`, weights as below
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        config = json.loads(archive.read("config.json"))
        archive.extract("model.weights.h5", tmp_path)
    saved = {layer["registered_name"] for layer in config["config"]["layers"][1:]}
    names = ("PatchTokenization", "ClassToken", "PositionEmbedding", "TransformerBlock", "TokenPooling")
    assert saved == {f"vitexp>{name}" for name in names}
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        block = weights["layers/transformer_block"]
        paths = set()
        block.visititems(lambda path, item: paths.add(path) if isinstance(item, h5py.Dataset) else None)
    assert paths == BLOCK_WEIGHTS


def test_every_layer_is_registered_under_its_class_name():
    for name in layers.__all__:
        if isinstance(getattr(layers, name), type) and name != "RandomStateMixin":
            assert keras.saving.get_registered_name(getattr(layers, name)) == f"vitexp>{name}"


def test_conv_tokenizer():
    layer = ConvTokenizer(patch_size=4, projection_dim=16)
    tokens = layer(RNG.random((2, 28, 28, 1)).astype("float32"))
    assert tokens.shape == (2, 49, 16)  # 28 / 4 = 7 cells a side
    assert roundtrip(layer).patch_size == 4
    with pytest.raises(ValueError, match="power of two"):
        ConvTokenizer(patch_size=6, projection_dim=16)


def test_conv_tokenizer_rounds_up_where_the_stride_does_not_divide_the_image():
    # 'same' padding: 28 -> 14 -> 7 -> 4 cells a side at stride 8; the model's position
    # embedding is sized from compute_output_shape, which once said 3 (floor)
    layer = ConvTokenizer(patch_size=8, projection_dim=16, channels=[8, 8, 8])
    assert layer.compute_output_shape((None, 28, 28, 1)) == (None, 16, 16)
    assert layer(RNG.random((2, 28, 28, 1)).astype("float32")).shape == (2, 16, 16)
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, PositionEmbedding("learned")(layer(inputs)))
    assert model(RNG.random((2, 28, 28, 1)).astype("float32")).shape == (2, 16, 16)


def test_conv_tokenizer_with_batchnorm_stem(tmp_path):
    layer = ConvTokenizer(patch_size=4, projection_dim=16, channels=[8, 8, 12])
    images = RNG.random((2, 28, 28, 1)).astype("float32")
    assert layer(images).shape == (2, 49, 16)
    kinds = [type(s).__name__ for s in layer.stages]
    # 3x3 conv + BN + ReLU per entry (stride 2, 2, then 1), then a 1x1 projection
    assert kinds == ["Conv2D", "BatchNormalization", "ReLU"] * 3 + ["Conv2D"]
    strides = [s.strides for s in layer.stages if type(s).__name__ == "Conv2D"]
    assert strides == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert layer.stages[-1].kernel_size == (1, 1)
    # BatchNorm uses batch statistics in training and its moving averages in inference
    assert not np.allclose(layer(images, training=True), layer(images, training=False))
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(model(images), again(images))
    with pytest.raises(ValueError, match="at least 2 stages"):
        ConvTokenizer(patch_size=4, projection_dim=16, channels=[8])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_expectation(rate):
    layer = Dropout(rate, seed=3)
    x = np.ones((8, 4, 96, 97), "float32")  # an odd last axis: two elements per 32-bit draw
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 0.005
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1 / (1 - round(rate * 65536) / 65536), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01
    again = keras.ops.convert_to_numpy(layer(x, training=True))
    assert (again == 0).mean() == pytest.approx(rate, abs=0.005)
    assert ((again == 0) != (y == 0)).mean() > rate  # each call draws a new mask
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


def test_dropout_mask_is_the_gradient_and_works_on_unknown_shapes_and_bfloat16():
    import tensorflow as tf

    layer = Dropout(0.25, seed=0, dtype="mixed_bfloat16")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.bfloat16)])
    def forward_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            total = tf.reduce_sum(tf.cast(y, tf.float32))
        return y, tape.gradient(total, x)

    x = tf.cast(tf.random.uniform((3, 5, 33)) + 1.0, tf.bfloat16)
    y, grad = forward_and_grad(x)
    assert y.shape == x.shape and y.dtype == tf.bfloat16
    scale = 1 / (1 - round(0.25 * 65536) / 65536)
    expected = np.where(y.numpy() == 0, 0.0, scale).astype("float32")
    np.testing.assert_allclose(tf.cast(grad, tf.float32).numpy(), expected, rtol=1e-2)
    assert 0.15 < (y.numpy() == 0).mean() < 0.35
    clone = roundtrip(layer)
    assert isinstance(clone, Dropout) and clone.rate == 0.25 and clone.compute_dtype == "bfloat16"
