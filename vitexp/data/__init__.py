"""Datasets as uint8 arrays in memory, loaded from the real file formats, and checked."""

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf


class DataError(RuntimeError):
    """A data file is missing or broken; the message is one line naming the file and fix."""


def keras_home() -> Path:
    """Keras' cache folder, where it keeps datasets and tfswin its weights: $KERAS_HOME or ~/.keras."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


@dataclass
class ImageData:
    """A dataset held as uint8 NHWC images and int32 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    source: str


def call_loader(cfg: DictConfig) -> ImageData:
    """Calls the data config's `_target_` with the config keys its signature names."""
    loader = get_method(cfg._target_)
    params = inspect.signature(loader).parameters
    values = OmegaConf.to_container(cfg, resolve=True)
    return loader(**{k: v for k, v in values.items() if k in params})


def check_data(data: ImageData, num_classes: int, image_shape: list[int]) -> None:
    """Raises DataError unless shapes, dtypes, labels and class names fit the config."""
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{data.source}: {split} images must be uint8 NHWC, got {x.dtype} {x.shape}")
        if list(x.shape[1:]) != list(image_shape):
            raise DataError(
                f"{data.source}: {split} images are {list(x.shape[1:])} but data.image_shape="
                f"{list(image_shape)}: set data.image_shape={list(x.shape[1:])}"
            )
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{data.source}: {split} has {len(x)} images and {len(y)} labels")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise DataError(
                f"{data.source}: {split} labels span [{low}, {high}], outside [0, {num_classes - 1}]"
                f": set data.num_classes={high + 1} or fix the labels"
            )
    if len(data.class_names) == 1 < num_classes:  # data.num_classes=1 is no way out
        raise DataError(
            f"{data.source}: one class ({data.class_names[0]}); a classifier needs at least two: "
            "add the images of another class (in an image folder, a sub-folder per class)"
        )
    if len(data.class_names) != num_classes:
        raise DataError(
            f"{data.source}: {len(data.class_names)} class names for data.num_classes="
            f"{num_classes}: set data.num_classes={len(data.class_names)}"
        )


def load_data(cfg: DictConfig, classes_from_data: bool = False) -> ImageData:
    """Loads, trims (train_limit/test_limit) and checks the dataset a data config names.

    Args:
        cfg: the data config.
        classes_from_data: take the class count from the data rather than holding it to
            `cfg.num_classes` (evaluate matches a data set's classes to a run's by name).
    """
    data = call_loader(cfg)
    if cfg.train_limit:
        data.train_x, data.train_y = data.train_x[: cfg.train_limit], data.train_y[: cfg.train_limit]
    if cfg.test_limit:
        data.test_x, data.test_y = data.test_x[: cfg.test_limit], data.test_y[: cfg.test_limit]
    data.train_y = data.train_y.astype(np.int32).reshape(-1)
    data.test_y = data.test_y.astype(np.int32).reshape(-1)
    num_classes = len(data.class_names) if classes_from_data else cfg.num_classes
    check_data(data, num_classes, list(cfg.image_shape))
    return data
