"""`optimizer=adamw`'s keys (the values: conf/optimizer/adamw.yaml)."""

from dataclasses import dataclass

from omegaconf import MISSING

from vitexp.optim.schema import OptimizerConfig


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "vitexp.optim.adamw.adamw"
    beta_1: float = MISSING
    beta_2: float = MISSING
