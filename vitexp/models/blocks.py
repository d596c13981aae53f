"""The pre-norm Transformer encoder block."""

from keras import layers

from vitexp.models.attention import MultiHeadSelfAttention
from vitexp.models.registration import register
from vitexp.models.regularization import Dropout, DropPath


@register
class TransformerBlock(layers.Layer):
    """Pre-norm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)), with dropout.

    Sublayers carry keras-hub's names (`self_attention`, `feedforward_dense_0`, ...). A
    `.keras` file stores their weights under the attributes that hold them (`attention`,
    `norm1`, `mlp`, `path_drop`), which stay as they were so older checkpoints load.

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
        self, num_heads, key_dim, mlp_units, dropout, attention_dropout, drop_path, locality, **kwargs
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
        policy = self.dtype_policy  # sublayers compute as the block does, also when reloaded
        if self.mlp_units[-1] != dim:
            raise ValueError(
                f"mlp_units ends with {self.mlp_units[-1]} but tokens are {dim} wide: "
                f"make the last MLP width {dim}"
            )
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="self_attention_layer_norm", dtype=policy)
        self.norm1.build(input_shape)
        self.attention = MultiHeadSelfAttention(
            self.num_heads,
            self.key_dim,
            self.attention_dropout,
            self.locality,
            name="self_attention",
            dtype=policy,
        )
        self.attention.build(input_shape)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="feedforward_layer_norm", dtype=policy)
        self.norm2.build(input_shape)
        self.mlp = []
        width = dim
        for i, units in enumerate(self.mlp_units):
            dense = layers.Dense(units, activation="gelu", name=f"feedforward_dense_{i}", dtype=policy)
            dense.build((None, None, width))
            self.mlp.append((dense, Dropout(self.dropout, name=f"feedforward_dropout_{i}", dtype=policy)))
            width = units
        self.path_drop = DropPath(self.drop_path, name="drop_path", dtype=policy)

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
