"""Vision Transformer layers in `keras.ops`: patches, position embeddings, encoder blocks.

Each layer stores every constructor argument and returns it from `get_config`, builds its
sublayers in `build()`, and is registered so a `.keras` checkpoint reloads in safe mode.
"""

import math
import random

import keras
import numpy as np
from keras import layers, ops

PACKAGE = "vitexp"


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchTokenization(layers.Layer):
    """Cuts images into non-overlapping patches and projects each to a token.

    With `shifted=True` the image is first stacked with four copies shifted diagonally by
    half a patch, and the patch vectors are layer-normalised before the projection
    (Shifted Patch Tokenization, Lee et al., 2021): each token then sees its neighbours.

    Args:
        patch_size: side of a square patch in pixels; the stride equals it (VALID).
        projection_dim: width of the tokens.
        shifted: use shifted patch tokenization.

    Returns:
        `(tokens, patches)`: `(batch, num_patches, projection_dim)` and the raw patches
        `(batch, num_patches, patch_size * patch_size * channels)`, row-major.
    """

    def __init__(self, patch_size, projection_dim, shifted=False, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.shifted = shifted

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image {height}x{width} is not divisible by patch_size={self.patch_size}: "
                "resize the image or pick a patch size that divides it"
            )
        depth = channels * (5 if self.shifted else 1)
        patch_dim = self.patch_size * self.patch_size * depth
        if self.shifted:
            self.patch_norm = layers.LayerNormalization(epsilon=1e-6, name="patch_norm")
            self.patch_norm.build((None, None, patch_dim))
        self.projection = layers.Dense(self.projection_dim, name="projection")
        self.projection.build((None, None, patch_dim))

    def _shifted_stack(self, images):
        half = self.patch_size // 2
        height, width = ops.shape(images)[1], ops.shape(images)[2]
        padded = ops.pad(images, [[0, 0], [half, half], [half, half], [0, 0]])
        shifts = [(0, 0), (0, 2 * half), (2 * half, 0), (2 * half, 2 * half)]
        crops = [padded[:, r : r + height, c : c + width, :] for r, c in shifts]
        return ops.concatenate([images, *crops], axis=-1)

    def extract_patches(self, images):
        if self.shifted:
            images = self._shifted_stack(images)
        p = self.patch_size
        _, height, width, channels = images.shape
        rows, cols = height // p, width // p
        x = ops.reshape(images, (-1, rows, p, cols, p, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, rows * cols, p * p * channels))

    def call(self, images):
        patches = self.extract_patches(images)
        x = self.patch_norm(patches) if self.shifted else patches
        return self.projection(x), patches

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        n = (height // self.patch_size) * (width // self.patch_size)
        depth = channels * (5 if self.shifted else 1)
        return (batch, n, self.projection_dim), (batch, n, self.patch_size**2 * depth)

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "projection_dim": self.projection_dim,
            "shifted": self.shifted,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvTokenizer(layers.Layer):
    """A convolutional tokenizer: a stem of strided 3x3 convolutions in place of patches.

    By default `log2(patch_size)` stages of 3x3 convolution with stride 2 + ReLU (Compact
    Convolutional Transformers, Hassani et al., 2021, tokenize likewise), so each token
    summarises a `patch_size` x `patch_size` cell like a patch, but with the locality and
    overlap that let a transformer learn from little data. With `channels`, the stem of
    Xiao et al., 2021 ("Early convolutions help transformers see better"): one 3x3
    convolution + BatchNorm + ReLU per entry, stride 2 until the total stride reaches
    `patch_size` and 1 after that, then a 1x1 convolution to `projection_dim`.

    Args:
        patch_size: a power of two: the total stride, as for patch tokenization.
        projection_dim: width of the tokens (the last stage's filters; earlier ones half).
        channels: filters of each 3x3 stage (at least `log2(patch_size)` entries); empty
            for the plain stem.

    Returns:
        `(batch, (H / patch_size) * (W / patch_size), projection_dim)` tokens.
    """

    def __init__(self, patch_size, projection_dim, channels=(), **kwargs):
        super().__init__(**kwargs)
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size={patch_size}: the conv tokenizer needs a power of two (2, 4, 8)")
        strided = int(math.log2(patch_size))
        if channels and len(channels) < strided:
            raise ValueError(
                f"channels={list(channels)}: a stride of {patch_size} needs at least {strided} stages"
            )
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.channels = tuple(int(c) for c in channels)

    def build(self, input_shape):
        strided = int(math.log2(self.patch_size))
        if self.channels:
            plan = [(c, 2 if i < strided else 1, True) for i, c in enumerate(self.channels)]
            plan.append((self.projection_dim, 1, False))
        else:
            plan = [
                (self.projection_dim if i == strided - 1 else max(self.projection_dim // 2, 16), 2, False)
                for i in range(strided)
            ]
        self.stages = []
        shape = tuple(input_shape)
        for i, (filters, stride, norm) in enumerate(plan):
            last_projection = self.channels and i == len(plan) - 1
            conv = layers.Conv2D(
                filters,
                1 if last_projection else 3,
                strides=stride,
                padding="same",
                activation=None if norm or last_projection else "relu",
                use_bias=not norm,
                name=f"c{i}",
            )
            conv.build(shape)
            shape = (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), filters)
            self.stages.append(conv)
            if norm:
                bn = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")
                bn.build(shape)
                self.stages.append(bn)
                self.stages.append(layers.ReLU(name=f"relu{i}"))

    def call(self, images, training=None):
        x = images
        for stage in self.stages:
            x = stage(x, training=training)  # Keras passes `training` on only where `call` takes it
        return ops.reshape(x, (-1, x.shape[1] * x.shape[2], x.shape[3]))

    def compute_output_shape(self, input_shape):
        _, height, width, _ = input_shape
        return (input_shape[0], (height // self.patch_size) * (width // self.patch_size), self.projection_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "projection_dim": self.projection_dim,
            "channels": list(self.channels),
        }


def sincos_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed sinusoidal encoding: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    two_i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / dim)
    table = np.zeros((num_positions, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return table.astype("float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(layers.Layer):
    """Adds a position code to each token: learned (one vector per position) or sincos (fixed).

    Args:
        kind: `"learned"` or `"sincos"`.
    """

    def __init__(self, kind="learned", **kwargs):
        super().__init__(**kwargs)
        if kind not in ("learned", "sincos"):
            raise ValueError(f"kind={kind!r}: use 'learned' or 'sincos'")
        self.kind = kind

    def build(self, input_shape):
        _, num_positions, dim = input_shape
        if self.kind == "learned":
            self.embedding = self.add_weight(
                shape=(num_positions, dim), initializer="uniform", name="embeddings"
            )
        else:
            self.embedding = ops.convert_to_tensor(sincos_table(num_positions, dim))

    def call(self, tokens):
        return tokens + ops.cast(self.embedding, tokens.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(layers.Layer):
    """Prepends one learned [CLS] token to the sequence."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="cls")

    def call(self, tokens):
        batch = ops.shape(tokens)[0]
        cls = ops.broadcast_to(ops.cast(self.token, tokens.dtype), (batch, 1, tokens.shape[-1]))
        return ops.concatenate([cls, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        n = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], n, input_shape[2])


def draw_seed(seed: int | None) -> int:
    """A layer's own seed: `seed`, or the next draw from the run's seed.

    `keras.utils.set_random_seed(trainer.seed)` seeds Python's generator, so each random
    layer of a model gets a distinct seed, in build order, that follows from the run's seed.
    """
    return int(seed) if seed is not None else random.randint(1, 2**31 - 1)


class RandomStateMixin:
    """Saves a random layer's generator state with its weights.

    Keras keeps a `SeedGenerator`'s state out of `.keras` files, so a run resumed from a
    checkpoint would replay the masks of its first epochs; with the state saved it draws
    the masks an uninterrupted run would have drawn. Checkpoints without it still load.
    """

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.seed_generator is not None:
            store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if self.seed_generator is not None and store is not None and "seed_state" in store:
            self.seed_generator.state.assign(np.asarray(store["seed_state"]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class Dropout(RandomStateMixin, layers.Dropout):
    """Keras' `Dropout`, with a mask that costs half the random bits under TensorFlow.

    TensorFlow's dropout draws a 32-bit number per element and turns it into a float; on
    the CPU that is most of the cost of a ViT's attention dropout (5.3 million weights per
    block at batch 64). Here each 32-bit draw gives two elements 16 bits each, compared
    as integers: ~2x cheaper forward and backward. The drop rate is realised to 1/65536
    (0.1 becomes 6554/65536) and kept values are scaled by the realised keep probability,
    so the expectation is unchanged. Other backends, and a `noise_shape`, use Keras' own.
    Without a `seed`, each instance draws its own from the run's seed (`draw_seed`).
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(rate, noise_shape=noise_shape, seed=draw_seed(seed), **kwargs)
        if not hasattr(self, "seed_generator"):  # rate 0 builds none
            self.seed_generator = None

    def call(self, inputs, training=False):
        if (
            not training
            or not 0 < self.rate < 1
            or self.noise_shape is not None
            or keras.backend.backend() != "tensorflow"
        ):
            return super().call(inputs, training=training)
        import tensorflow as tf

        threshold = min(round(self.rate * 65536), 65535)
        keep = 1.0 - threshold / 65536
        seed = keras.random.randint((2,), 0, 2**31 - 1, dtype="int32", seed=self.seed_generator)
        shape = tf.shape(inputs)
        last = inputs.shape[-1]
        draws = tf.random.stateless_uniform(
            tf.concat([shape[:-1], [((last or shape[-1]) + 1) // 2]], axis=0),
            seed,
            minval=None,
            maxval=None,
            dtype=tf.uint32,
        )
        bits = tf.reshape(tf.bitcast(draws, tf.uint16), tf.concat([shape[:-1], [-1]], axis=0))
        if last is None or last % 2:
            bits = bits[..., : shape[-1]]
        zero = tf.zeros((), inputs.dtype)  # broadcast by the select: no tensor of zeros
        return tf.where(bits >= threshold, inputs * tf.cast(1.0 / keep, inputs.dtype), zero)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(layers.Layer):
    """Multi-head self-attention that can hand back its attention weights.

    With `locality=True` it is Locality Self-Attention (Lee et al., 2021): each token may
    not attend to itself and the softmax temperature is learned.

    Args:
        num_heads: number of heads.
        key_dim: width of each head (the textbook uses the token width).
        dropout: dropout on the attention weights.
        locality: use locality self-attention.
    """

    def __init__(self, num_heads, key_dim, dropout=0.0, locality=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.dropout = dropout
        self.locality = locality

    def build(self, input_shape):
        dim = input_shape[-1]
        inner = self.num_heads * self.key_dim
        self.query = layers.Dense(inner, name="query")
        self.key = layers.Dense(inner, name="key")
        self.value = layers.Dense(inner, name="value")
        for dense in (self.query, self.key, self.value):
            dense.build(input_shape)
        self.output_dense = layers.Dense(dim, name="attention_output")
        self.output_dense.build((None, None, inner))
        self.attention_dropout = Dropout(self.dropout)
        if self.locality:
            self.log_temperature = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(math.log(math.sqrt(self.key_dim))),
                name="log_temperature",
            )

    def _split_heads(self, x):
        x = ops.reshape(x, (-1, ops.shape(x)[1], self.num_heads, self.key_dim))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, x, training=False, return_attention=False):
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        if self.locality:
            scale = ops.cast(ops.exp(-self.log_temperature), q.dtype)
        else:
            scale = ops.cast(1.0 / math.sqrt(self.key_dim), q.dtype)
        scores = ops.matmul(q * scale, ops.transpose(k, (0, 1, 3, 2)))
        if self.locality:
            n = ops.shape(scores)[-1]
            diagonal = ops.cast(ops.eye(n), scores.dtype)
            scores = scores - diagonal * ops.cast(1e4, scores.dtype)
        weights = ops.softmax(ops.cast(scores, "float32"), axis=-1)
        context = ops.matmul(self.attention_dropout(ops.cast(weights, v.dtype), training=training), v)
        context = ops.reshape(
            ops.transpose(context, (0, 2, 1, 3)), (-1, ops.shape(x)[1], self.num_heads * self.key_dim)
        )
        out = self.output_dense(context)
        return (out, weights) if return_attention else out

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "dropout": self.dropout,
            "locality": self.locality,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(RandomStateMixin, layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample while training.

    Args:
        rate: probability of dropping the branch.
        seed: this layer's seed; None draws one from the run's seed (`draw_seed`), so
            every block drops its own samples.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = draw_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype) < keep
        return x * ops.cast(mask, x.dtype) / ops.cast(keep, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(layers.Layer):
    """Pre-norm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)), with dropout.

    Args:
        num_heads: attention heads.
        key_dim: width of each head.
        mlp_units: widths of the MLP's GELU layers; the last must equal the token width.
        dropout: dropout after each MLP layer.
        attention_dropout: dropout on the attention weights.
        drop_path: stochastic-depth rate of both residual branches.
        locality: use locality self-attention.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        mlp_units,
        dropout=0.1,
        attention_dropout=0.1,
        drop_path=0.0,
        locality=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.mlp_units = list(mlp_units)
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.drop_path = drop_path
        self.locality = locality

    def build(self, input_shape):
        dim = input_shape[-1]
        if self.mlp_units[-1] != dim:
            raise ValueError(
                f"mlp_units ends with {self.mlp_units[-1]} but tokens are {dim} wide: "
                f"make the last MLP width {dim}"
            )
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.norm1.build(input_shape)
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.key_dim, self.attention_dropout, self.locality, name="attention"
        )
        self.attention.build(input_shape)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.norm2.build(input_shape)
        self.mlp = []
        width = dim
        for i, units in enumerate(self.mlp_units):
            dense = layers.Dense(units, activation="gelu", name=f"mlp_{i}")
            dense.build((None, None, width))
            self.mlp.append((dense, Dropout(self.dropout)))
            width = units
        self.path_drop = DropPath(self.drop_path)

    def call(self, x, training=False, return_attention=False):
        attended, weights = self.attention(self.norm1(x), training=training, return_attention=True)
        x = x + self.path_drop(attended, training=training)
        y = self.norm2(x)
        for dense, drop in self.mlp:
            y = drop(dense(y), training=training)
        x = x + self.path_drop(y, training=training)
        return (x, weights) if return_attention else x

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "mlp_units": self.mlp_units,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "drop_path": self.drop_path,
            "locality": self.locality,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenPooling(layers.Layer):
    """Turns the token sequence into one vector: flatten (textbook), cls (first token) or gap.

    Args:
        mode: `"flatten"`, `"cls"` or `"gap"`.
    """

    def __init__(self, mode="flatten", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("flatten", "cls", "gap"):
            raise ValueError(f"mode={mode!r}: use 'flatten', 'cls' or 'gap'")
        self.mode = mode

    def call(self, tokens):
        if self.mode == "cls":
            return tokens[:, 0]
        if self.mode == "gap":
            return ops.mean(tokens, axis=1)
        return ops.reshape(tokens, (-1, tokens.shape[1] * tokens.shape[2]))

    def compute_output_shape(self, input_shape):
        if self.mode == "flatten":
            return (input_shape[0], input_shape[1] * input_shape[2])
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
