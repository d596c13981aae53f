"""Multi-head self-attention that can hand back its weights, with locality self-attention."""

import math

import keras
from keras import layers, ops

from vitexp.models.registration import register
from vitexp.models.regularization import Dropout


@register
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
        policy = self.dtype_policy  # sublayers compute as this layer does, also when reloaded
        self.query = layers.Dense(inner, name="query", dtype=policy)
        self.key = layers.Dense(inner, name="key", dtype=policy)
        self.value = layers.Dense(inner, name="value", dtype=policy)
        for dense in (self.query, self.key, self.value):
            dense.build(input_shape)
        self.output_dense = layers.Dense(dim, name="attention_output", dtype=policy)
        self.output_dense.build((None, None, inner))
        self.attention_dropout = Dropout(self.dropout, name="attention_dropout", dtype=policy)
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
