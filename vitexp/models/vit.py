"""The Vision Transformer: the textbook's classifier, with the design choices as arguments."""

import keras
import numpy as np
from keras import layers

from vitexp.models.blocks import TransformerBlock
from vitexp.models.classifier import at_size, classification_head
from vitexp.models.tokenizers import ConvTokenizer, PatchTokenization
from vitexp.models.tokens import ClassToken, PositionEmbedding, TokenPooling


def build_vit(
    num_classes,
    input_shape,
    image_size,
    patch_size,
    depth,
    projection_dim,
    num_heads,
    head_dim,
    transformer_units,
    head_units,
    dropout,
    attention_dropout,
    head_dropout,
    drop_path,
    pooling,
    pos_embedding,
    shifted_patches,
    locality_attention,
    tokenizer,
    stem_channels,
    name,
):
    """Builds a ViT classifier that maps raw pixels (any scale, uint8 welcome) to logits.

    conf/model/vit.yaml holds the textbook's values. The first layer (`input_norm`)
    standardises each channel with statistics that `adapt_input_norm` sets from the training
    images.

    Args: num_classes (logits), input_shape (the stored images' `(height, width,
    channels)`), name, and the model keys, each documented in `ViTConfig`
    (vitexp/models/vit_schema.py).

    Returns:
        A functional `keras.Model` with float32 logits.
    """
    inputs = keras.Input(tuple(input_shape), name="images")
    x = at_size(layers.Normalization(axis=-1, name="input_norm")(inputs), input_shape, image_size)
    tokens = tokenize(x, tokenizer, patch_size, projection_dim, shifted_patches, stem_channels)
    if pooling == "cls":
        tokens = ClassToken(name="cls_token")(tokens)
    x = PositionEmbedding(pos_embedding, name="pos_embedding")(tokens)
    block = dict(
        num_heads=num_heads,
        key_dim=head_dim or projection_dim,
        mlp_units=transformer_units,
        dropout=dropout,
        attention_dropout=attention_dropout,
        locality=locality_attention,
    )
    x = encode(x, depth, drop_path, **block)
    x = TokenPooling(pooling, name="pool")(x)
    return keras.Model(inputs, classification_head(x, head_units, head_dropout, num_classes), name=name)


def tokenize(images, tokenizer, patch_size, projection_dim, shifted_patches, stem_channels):
    """The image as `(batch, tokens, projection_dim)`: projected patches or a conv stem's cells."""
    if tokenizer == "conv":
        return ConvTokenizer(patch_size, projection_dim, stem_channels, name="patches")(images)
    tokens, _ = PatchTokenization(patch_size, projection_dim, shifted=shifted_patches, name="patches")(images)
    return tokens


def encode(tokens, depth: int, drop_path: float, **block):
    """`depth` encoder blocks, stochastic depth rising linearly to `drop_path`, then a LayerNorm."""
    rates = np.linspace(0.0, drop_path, depth) if depth > 1 else [drop_path]
    x = tokens
    for i in range(depth):
        x = TransformerBlock(drop_path=float(rates[i]), name=f"block_{i}", **block)(x)
    return layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)


def attention_maps(model: keras.Model, images) -> list:
    """Each block's attention weights for `images`, computed with `model`'s own layers.

    The classifier never computes more than its logits; this replays its chain of layers
    eagerly up to the last block, asking each block for its weights.

    Returns:
        One `(batch, heads, tokens, tokens)` float32 array per block, rows summing to 1.
    """
    if not has_attention(model):
        raise ValueError(f"model {model.name!r} has no TransformerBlock layers to explain")
    x, maps = keras.ops.cast(images, "float32"), []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, TransformerBlock):
            x, weights = layer(x, training=False, return_attention=True)
            maps.append(keras.ops.convert_to_numpy(keras.ops.cast(weights, "float32")))
        elif maps:
            break
        else:
            x = layer(x)
            x = x[0] if isinstance(layer, PatchTokenization) else x
    return maps


def has_attention(model) -> bool:
    """Whether the model has attention maps to show (a ViT; tfswin keeps its own hidden)."""
    return any(isinstance(layer, TransformerBlock) for layer in model.layers)


def learned_positions(model) -> np.ndarray | None:
    """The learned position embeddings `(positions, dim)`, or None (sincos, Swin)."""
    try:
        layer = model.get_layer("pos_embedding")
    except ValueError:
        return None
    return np.asarray(layer.embedding) if layer.kind == "learned" else None


def has_cls_token(model) -> bool:
    """Whether the model prepends a [CLS] token (its first token is then not a patch)."""
    try:
        model.get_layer("cls_token")
        return True
    except ValueError:
        return False
