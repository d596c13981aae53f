"""The Vision Transformer: the textbook's classifier, with the design choices as arguments."""

import keras
import numpy as np
from keras import layers

from vitexp.models.layers import (
    ClassToken,
    ConvTokenizer,
    Dropout,
    PatchTokenization,
    PositionEmbedding,
    TokenPooling,
    TransformerBlock,
)


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

    Args:
        num_classes: number of output logits.
        input_shape: `(height, width, channels)` of the stored images.
        image_size: images are resized to this square size before patching.
        patch_size: side of each square patch.
        depth: number of encoder blocks.
        projection_dim: token width.
        num_heads: attention heads per block.
        head_dim: width of each head; None makes each head `projection_dim` wide, as in
            the textbook (the usual ViT choice is `projection_dim // num_heads`).
        transformer_units: MLP widths inside each block; the last equals projection_dim.
        head_units: widths of the GELU MLP head after pooling.
        dropout: dropout inside the blocks.
        attention_dropout: dropout on the attention weights.
        head_dropout: dropout before and inside the head.
        drop_path: stochastic depth, rising linearly to this rate in the last block.
        pooling: `flatten` (textbook), `cls` or `gap`.
        pos_embedding: `learned` (textbook) or `sincos`.
        shifted_patches: shifted patch tokenization (Lee et al., 2021).
        locality_attention: locality self-attention (Lee et al., 2021).
        tokenizer: `patch` (linear projection of patches) or `conv` (a convolutional
            tokenizer of total stride `patch_size`, as in Compact Convolutional Transformers).
        stem_channels: with `tokenizer="conv"`, the filters of each 3x3 conv + BatchNorm
            stage (Xiao et al., 2021); empty for the plain strided stem.
        name: model name.

    Returns:
        A functional `keras.Model` with float32 logits.
    """
    inputs = keras.Input(tuple(input_shape), name="images")
    x = layers.Normalization(axis=-1, name="input_norm")(inputs)
    if tuple(input_shape[:2]) != (image_size, image_size):
        x = layers.Resizing(image_size, image_size, name="resize")(x)
    if tokenizer == "conv":
        tokens = ConvTokenizer(patch_size, projection_dim, stem_channels, name="patches")(x)
    else:
        tokens, _ = PatchTokenization(patch_size, projection_dim, shifted=shifted_patches, name="patches")(x)
    if pooling == "cls":
        tokens = ClassToken(name="cls_token")(tokens)
    x = PositionEmbedding(pos_embedding, name="pos_embedding")(tokens)
    rates = np.linspace(0.0, drop_path, depth) if depth > 1 else [drop_path]
    for i in range(depth):
        x = TransformerBlock(
            num_heads,
            head_dim or projection_dim,
            transformer_units,
            dropout=dropout,
            attention_dropout=attention_dropout,
            drop_path=float(rates[i]),
            locality=locality_attention,
            name=f"block_{i}",
        )(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = TokenPooling(pooling, name="pool")(x)
    x = Dropout(head_dropout, name="head_dropout")(x)
    for i, units in enumerate(head_units):
        x = layers.Dense(units, activation="gelu", name=f"head_{i}")(x)
        x = Dropout(head_dropout, name=f"head_dropout_{i}")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def attention_maps(model: keras.Model, images) -> list:
    """Each block's attention weights for `images`, computed with `model`'s own layers.

    The classifier never computes more than its logits; this replays its chain of layers
    eagerly up to the last block, asking each block for its weights.

    Returns:
        One `(batch, heads, tokens, tokens)` float32 array per block, rows summing to 1.
    """
    if not any(isinstance(layer, TransformerBlock) for layer in model.layers):
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
