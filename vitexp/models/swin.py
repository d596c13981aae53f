"""Swin Transformer through tfswin, with the platform's own classification head.

tfswin 4.x normalises inside the model with ImageNet statistics and expects 0-255
pixels, so images go in raw (no second normalisation). Its `MLP` layer fails to reload
from a `.keras` file (it adds a tuple to a list of dimensions); the subclass below is
registered under tfswin's own name and used by its blocks, so checkpoints reload in safe
mode with identical outputs.
"""

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import keras
from keras import layers

from vitexp.data import keras_home
from vitexp.models.classifier import at_size, classification_head
from vitexp.validate import ConfigError

try:  # not a declared dependency: its numpy<2 pin is stale (pyproject.toml)
    import tfswin
    import tfswin.swin
    from tfswin.mlp import MLP
    from tfswin.model import WEIGHT_HASHES, WEIGHT_URLS
except ModuleNotFoundError:
    raise ConfigError(
        "Swin models need tfswin, which is not installed: pip install --no-deps tfswin==4.1.1 "
        "(make install does it)"
    ) from None

IMAGENET_CLASSES = 21841  # tfswin's v1 ImageNet weights carry the 22k-class head


@keras.saving.register_keras_serializable(package="TFSwin", name="MLP")
class ReloadableMLP(MLP):
    """tfswin's MLP, accepting the list-typed shapes a reloaded config hands to `build`."""

    def build(self, input_shape):
        super().build(tuple(input_shape))


# Swin blocks create their MLP by class in build(), also when a checkpoint is reloaded.
tfswin.swin.MLP = ReloadableMLP


def weights_cache() -> Path:
    return keras_home() / "tfswin"


def _download(url: str, target: Path, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        urllib.request.urlopen(url, timeout=timeout) as reply,
        tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp,
    ):
        shutil.copyfileobj(reply, tmp)
    os.replace(tmp.name, target)


def resolve_weights(weights: str | None, variant: str, timeout: float = 10.0) -> str | None:
    """Turns `imagenet` into a local file (cached, or downloaded within seconds), else fails.

    Returns:
        None (random initialisation) or the path of an `.h5` weights file.
    """
    if weights is None:
        return None
    if weights != "imagenet":
        if not Path(weights).is_file():
            raise ConfigError(f"model.weights={weights}: no such file; give an .h5 weights file")
        return weights
    if variant not in WEIGHT_URLS:
        raise ConfigError(
            f"model.variant={variant!r} has no ImageNet weights: use one of {sorted(WEIGHT_URLS)}"
        )
    url = WEIGHT_URLS[variant]
    target = weights_cache() / os.path.basename(url)
    if not target.is_file():
        try:
            _download(url, target, timeout)
        except OSError as err:
            raise ConfigError(
                f"model.weights=imagenet: {target.name} is not in {target.parent}/ and cannot be "
                f"downloaded ({getattr(err, 'reason', err)}): put {url} there, or set "
                "model.weights=/path/to/file.h5 or model.weights=null"
            ) from None
    from keras.src.utils.file_utils import validate_file

    if not validate_file(str(target), WEIGHT_HASHES[variant]):
        raise ConfigError(f"{target}: sha256 does not match tfswin's; delete it and download again")
    return str(target)


def build_swin(
    num_classes,
    input_shape,
    variant,
    image_size,
    patch_size,
    depth,
    depths,
    embed_dim,
    num_heads,
    window_size,
    pretrain_size,
    mlp_ratio,
    dropout,
    attention_dropout,
    drop_path,
    weights,
    head_units,
    head_dropout,
    name,
):
    """Builds a Swin classifier: resize, tfswin backbone (average-pooled), GELU head, logits.

    Args: num_classes (logits), input_shape (the stored images' `(height, width,
    channels)`), name, and the model keys, each documented in `SwinConfig`
    (vitexp/models/swin_schema.py).

    Returns:
        A functional `keras.Model` with float32 logits.
    """
    inputs = keras.Input(tuple(input_shape), name="images")
    x = layers.Concatenate(name="grey_to_rgb")([inputs] * 3) if input_shape[-1] == 1 else inputs
    stages = dict(
        embed_dim=embed_dim,
        depths=[*depths[:2], depth, *depths[3:]],
        num_heads=list(num_heads),
        patch_size=patch_size,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        drop_rate=dropout,
        attn_drop=attention_dropout,
        path_drop=drop_path,
    )
    backbone = swin_backbone(variant, weights, image_size, pretrain_size, stages, name)
    features = backbone(at_size(x, input_shape, image_size))
    logits = classification_head(features, head_units, head_dropout, num_classes)
    return keras.Model(inputs, logits, name=name)


def swin_backbone(variant, weights, image_size, pretrain_size, stages: dict, name):
    """tfswin's average-pooled backbone for 0-255 RGB images of `image_size`, with `stages`
    (tfswin's own argument names) and the weights `resolve_weights` finds for `variant`."""
    return tfswin.SwinTransformer(
        pretrain_size=pretrain_size,
        model_name=variant if weights else name,
        include_top=False,
        weights=resolve_weights(weights, variant),
        input_shape=(image_size, image_size, 3),
        pooling="avg",
        classes=IMAGENET_CLASSES,
        include_preprocessing=True,
        **stages,
    )
