"""What every model family's config schema holds, and how the families are found.

A model family is three files and nothing else lists it: its factory
(`vitexp/models/<family>.py`), its schema (`vitexp/models/<family>_schema.py`: a
`ModelConfig` subclass whose `check` names each mistake in one line) and its options
(`conf/model/<family>*.yaml`, which extend `/<family>_schema@_here_`). The values live in
the options; a schema gives their types and allowed values.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import II, MISSING

from vitexp.schema import find_schemas
from vitexp.validate import check_range, require


@dataclass
class ModelConfig:
    """The keys every family has: its factory, name, input and output, and the `patch_size` and
    `depth` shortcuts (`${shortcut:patch_size,6}` in an option reads the top-level key)."""

    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = II("data.num_classes")
    input_shape: list[int] = II("data.image_shape")
    image_size: int = MISSING
    patch_size: int = MISSING
    depth: int = MISSING

    @classmethod
    def check(cls, m: Any) -> None:
        """Raises ConfigError for the first problem of the composed model config `m`."""
        require(m.depth >= 1, f"model.depth={m.depth}: use at least 1 transformer layer (depth=...)")
        require(m.patch_size >= 1, f"model.patch_size={m.patch_size}: use a positive patch size")
        for key in ("dropout", "attention_dropout", "head_dropout", "drop_path"):
            if key in m:
                check_range(f"model.{key}", m[key], 0.0, 1.0)
        if cls.patches_must_tile(m):
            require(
                m.image_size % m.patch_size == 0,
                f"model.image_size={m.image_size} is not divisible by patch_size={m.patch_size}: "
                f"pick a patch size that divides {m.image_size} (e.g. patch_size="
                f"{_nearest_divisor(m.image_size, m.patch_size)}) or change model.image_size",
            )

    @classmethod
    def patches_must_tile(cls, m: Any) -> bool:
        """Whether the patches must tile the image exactly (a family with padding says no)."""
        return True


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def family_schemas() -> dict[str, type[ModelConfig]]:
    """Every `vitexp/models/*_schema.py`'s schema, by its ConfigStore name (`vit_schema`)."""
    return find_schemas("vitexp.models", ModelConfig)
