"""`data=synthetic`'s keys (the values: conf/data/synthetic.yaml)."""

from dataclasses import dataclass

from omegaconf import MISSING

from vitexp.data.schema import DataConfig


@dataclass
class SyntheticDataConfig(DataConfig):
    _target_: str = "vitexp.data.synthetic.load_synthetic"
    name: str = "synthetic"
    num_train: int = MISSING
    num_test: int = MISSING
    noise: float = MISSING
    seed: int = MISSING
