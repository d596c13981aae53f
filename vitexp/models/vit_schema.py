"""The ViT family's config schema (`vit_schema`): its keys, their types and allowed values,
and the checks that need several of them (the values are in conf/model/vit.yaml)."""

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from vitexp.models.schema import ModelConfig
from vitexp.validate import require


class Pooling(StrEnum):
    flatten = "flatten"
    cls = "cls"
    gap = "gap"


class PosEmbedding(StrEnum):
    learned = "learned"
    sincos = "sincos"


class Tokenizer(StrEnum):
    patch = "patch"
    conv = "conv"


CONV_STRIDES = (2, 4, 8, 16)


@dataclass
class ViTConfig(ModelConfig):
    """The keys of conf/model/vit.yaml and its variants.

    Attributes:
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
    """

    _target_: str = "vitexp.models.vit.build_vit"
    projection_dim: int = MISSING
    num_heads: int = MISSING
    head_dim: int | None = MISSING
    transformer_units: list[int] = MISSING
    head_units: list[int] = MISSING
    dropout: float = MISSING
    attention_dropout: float = MISSING
    head_dropout: float = MISSING
    drop_path: float = MISSING
    pooling: Pooling = MISSING
    pos_embedding: PosEmbedding = MISSING
    shifted_patches: bool = MISSING
    locality_attention: bool = MISSING
    tokenizer: Tokenizer = MISSING
    stem_channels: list[int] = MISSING

    @classmethod
    def check(cls, m: Any) -> None:
        super().check(m)
        if m.head_dim is not None:
            require(m.head_dim >= 1, f"model.head_dim={m.head_dim}: use a positive width or null")
        require(
            m.projection_dim % m.num_heads == 0,
            f"model.projection_dim={m.projection_dim} is not divisible by num_heads={m.num_heads}: "
            "change model.num_heads or model.projection_dim",
        )
        require(
            len(m.transformer_units) >= 1 and m.transformer_units[-1] == m.projection_dim,
            f"model.transformer_units={list(m.transformer_units)} must end with projection_dim="
            f"{m.projection_dim} (the MLP output is added back to the tokens)",
        )
        check_tokenizer(m)
        require(m.image_size >= m.patch_size, "model.image_size must be at least the patch size")

    @classmethod
    def patches_must_tile(cls, m: Any) -> bool:
        return m.tokenizer != Tokenizer.conv  # the conv stem pads: 28x28 at stride 8 gives 4x4 tokens


def check_tokenizer(m: Any) -> None:
    if m.tokenizer == Tokenizer.conv:
        require(
            m.patch_size in CONV_STRIDES,
            f"model.patch_size={m.patch_size}: the conv tokenizer's stride must be 2, 4, 8 or 16",
        )
        strided = m.patch_size.bit_length() - 1
        require(
            not m.stem_channels or len(m.stem_channels) >= strided,
            f"model.stem_channels={list(m.stem_channels)}: patch_size={m.patch_size} needs at least "
            f"{strided} stride-2 stages; give {strided} or more entries, or [] for the plain stem",
        )
    require(
        not m.stem_channels or m.tokenizer == Tokenizer.conv,
        "model.stem_channels is for the conv tokenizer: add model.tokenizer=conv or drop stem_channels",
    )
