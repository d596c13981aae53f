"""What every dataset's schema holds, and its checks.

A dataset is its own files (`vitexp.schema`): its loader (`vitexp/data/<name>.py`, the
option's `_target_`) and its option `conf/data/<name>.yaml`, which extends `data_schema`
(`DataConfig`), or, where the loader takes keys of its own, a `<name>_schema.py` beside the
loader with a `DataConfig` subclass (synthetic). `vitexp.data.load_data` hands the loader
the keys its signature names and applies the limits and checks every dataset shares.
"""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from vitexp.validate import check_range, require


@dataclass
class AugmentConfig:
    random_crop_padding: int = 0
    random_resized_crop: bool = False
    horizontal_flip: bool = False
    rand_augment: bool = False
    rand_augment_magnitude: float = 0.5
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0


@dataclass
class DataConfig:
    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = MISSING
    image_shape: list[int] = MISSING
    path: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def check(cls, d: Any) -> None:
        require(d.num_classes >= 2, f"data.num_classes={d.num_classes}: need at least 2 classes")
        shape = list(d.image_shape)
        require(
            len(shape) == 3 and shape[2] in (1, 3) and min(shape) >= 1,
            f"data.image_shape={shape}: use [height, width, channels] with 1 or 3 channels",
        )
        for key in ("train_limit", "test_limit"):
            if d[key] is not None:
                require(d[key] >= 1, f"data.{key}={d[key]}: use a positive count or null")
        aug = d.augment
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(aug[key] >= 0, f"data.augment.{key}={aug[key]}: use 0 (off) or a positive alpha")
        check_range("data.augment.random_erasing", aug.random_erasing, 0.0, 1.0)
        check_range("data.augment.rand_augment_magnitude", aug.rand_augment_magnitude, 0.0, 1.01)
