"""Model families and what every model needs: input statistics, reload.

A family is its factory (`<family>.py`) and its config schema (`<family>_schema.py`, found
by `vitexp.models.schema.family_schemas`). Keras is imported on use, so the command line
reads the schemas without loading TensorFlow.
"""

import contextlib
import importlib
import pkgutil
from typing import TYPE_CHECKING

import numpy as np

from vitexp.validate import ConfigError

if TYPE_CHECKING:
    import keras


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of images (uint8 or float), in chunks (no float copy of the set)."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
    count = images.size // channels
    mean = total / count
    return mean, total_sq / count - np.square(mean)


def adapt_input_norm(model: "keras.Model", images: np.ndarray) -> bool:
    """Sets the `input_norm` layer's statistics from training images, as `adapt()` would.

    Returns:
        Whether the model has such a layer (Swin normalises with ImageNet's statistics).
    """
    try:
        norm = model.get_layer("input_norm")
    except ValueError:
        return False
    mean, variance = channel_stats(images)
    norm.set_weights([mean.astype("float32"), variance.astype("float32"), np.array(len(images))])
    norm.finalize_state()  # Normalization caches its statistics; refresh them
    return True


def load_model(path: str) -> "keras.Model":
    """Loads a `.keras` checkpoint in safe mode, with every vitexp class registered first
    (every family's layers, and the learning-rate schedule)."""
    import keras

    for module in pkgutil.iter_modules(__path__):
        with contextlib.suppress(ConfigError):  # a family whose package is missing (tfswin)
            importlib.import_module(f"{__name__}.{module.name}")
    optim = importlib.import_module("vitexp.optim")  # the fused AdamW, the schedule
    for module in pkgutil.iter_modules(optim.__path__):
        importlib.import_module(f"vitexp.optim.{module.name}")
    return keras.saving.load_model(path, safe_mode=True)
