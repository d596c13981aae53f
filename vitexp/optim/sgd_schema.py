"""`optimizer=sgd`'s keys (the values: conf/optimizer/sgd.yaml)."""

from dataclasses import dataclass

from omegaconf import MISSING

from vitexp.optim.schema import OptimizerConfig


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "vitexp.optim.sgd.sgd"
    momentum: float = MISSING
    nesterov: bool = MISSING
