"""What surrounds the encoder blocks: position codes, the [CLS] token, pooling to one vector."""

import numpy as np
from keras import layers, ops

from vitexp.models.registration import register


def sincos_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed sinusoidal encoding: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    two_i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / dim)
    table = np.zeros((num_positions, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return table.astype("float32")


@register
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


@register
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


@register
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
