"""The Swin family's config schema (`swin_schema`): its keys and types, and the checks that
need several of them (the values are in conf/model/swin.yaml; variants extend it)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from vitexp.models.schema import ModelConfig
from vitexp.validate import require


@dataclass
class SwinConfig(ModelConfig):
    """The keys of conf/model/swin.yaml and its variants.

    Attributes:
        variant: tfswin's name of the pretrained model (`swin_tiny_224`, ...), for weights.
        image_size: images are resized to this square size (32 at least; 224 for pretrained).
        patch_size: patch-embedding size.
        depth: depth of the third stage (the one that differs between Swin-T and Swin-S).
        depths: the four stage depths; the third is replaced by `depth`.
        embed_dim: width of the first stage.
        num_heads: heads per stage.
        window_size: attention window.
        pretrain_size: the image size the weights were trained at.
        mlp_ratio: MLP width over token width.
        dropout: dropout inside the blocks.
        attention_dropout: dropout on the attention weights.
        drop_path: stochastic depth, rising to this rate in the last block.
        weights: None (scratch), `imagenet`, or a path to an `.h5` file.
        head_units: widths of an optional GELU MLP head.
        head_dropout: dropout before each head layer.
    """

    _target_: str = "vitexp.models.swin.build_swin"
    variant: str = MISSING
    depths: list[int] = MISSING
    embed_dim: int = MISSING
    num_heads: list[int] = MISSING
    window_size: int = MISSING
    pretrain_size: int = MISSING
    mlp_ratio: float = MISSING
    dropout: float = MISSING
    attention_dropout: float = MISSING
    drop_path: float = MISSING
    weights: str | None = MISSING
    head_units: list[int] = MISSING
    head_dropout: float = MISSING

    @classmethod
    def check(cls, m: Any) -> None:
        super().check(m)
        require(
            m.image_size >= 32,
            f"model.image_size={m.image_size}: Swin needs inputs of at least 32 pixels "
            "(set model.image_size=32 or more; images are resized on the fly)",
        )
        require(
            len(m.depths) == len(m.num_heads) == 4,
            "model.depths and model.num_heads must each list 4 stages",
        )
        side = m.image_size // m.patch_size
        require(
            side % 8 == 0,
            f"model.image_size={m.image_size} / patch_size={m.patch_size} gives a {side}x{side} "
            "token map; Swin halves it 3 times, so it must be divisible by 8: use image_size = "
            f"{8 * m.patch_size * max(1, round(side / 8))} or another patch size",
        )
        require(
            m.embed_dim % m.num_heads[0] == 0,
            f"model.embed_dim={m.embed_dim} is not divisible by num_heads[0]={m.num_heads[0]}",
        )
        check_weights(m)


def check_weights(m: Any) -> None:
    if m.weights not in (None, "imagenet"):
        require(
            Path(m.weights).expanduser().is_file(),
            f"model.weights={m.weights}: no such file; give an .h5 weights file, imagenet or null",
        )
    if m.weights == "imagenet":
        require(
            m.patch_size == 4 and list(m.depths[:2]) == [2, 2] and m.depth in (6, 18),
            "model.weights=imagenet needs the pretrained layout (patch_size=4, depth=6 for "
            "Swin-T or 18 for Swin-S/B/L): drop the patch_size/depth overrides or use "
            "model.weights=null",
        )
