"""Tokenizers: images into a sequence of tokens, by patches or by a convolutional stem."""

import math

from keras import layers, ops

from vitexp.models.registration import register


@register
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
            self.patch_norm = layers.LayerNormalization(
                epsilon=1e-6, name="patch_norm", dtype=self.dtype_policy
            )
            self.patch_norm.build((None, None, patch_dim))
        self.projection = layers.Dense(self.projection_dim, name="projection", dtype=self.dtype_policy)
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


@register
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
        `(batch, ceil(H / patch_size) * ceil(W / patch_size), projection_dim)` tokens.
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
                name=f"conv_{i}",
                dtype=self.dtype_policy,
            )
            conv.build(shape)
            shape = (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), filters)
            self.stages.append(conv)
            if norm:
                bn = layers.BatchNormalization(momentum=0.9, name=f"batch_norm_{i}", dtype=self.dtype_policy)
                bn.build(shape)
                self.stages.append(bn)
                self.stages.append(layers.ReLU(name=f"relu_{i}", dtype=self.dtype_policy))

    def call(self, images, training=None):
        x = images
        for stage in self.stages:
            x = stage(x, training=training)  # Keras passes `training` on only where `call` takes it
        return ops.reshape(x, (-1, x.shape[1] * x.shape[2], x.shape[3]))

    def compute_output_shape(self, input_shape):
        _, height, width, _ = input_shape
        # 'same' padding: each stride-2 stage rounds up, so 28x28 at stride 8 gives 4x4 tokens
        cells = (-(-height // self.patch_size)) * (-(-width // self.patch_size))
        return (input_shape[0], cells, self.projection_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "projection_dim": self.projection_dim,
            "channels": list(self.channels),
        }
