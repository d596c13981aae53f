"""`schedule=warmup_cosine`'s keys (the values: conf/schedule/warmup_cosine.yaml)."""

from dataclasses import dataclass

from vitexp.optim.schema import ScheduleConfig


@dataclass
class WarmupCosineConfig(ScheduleConfig):
    _target_: str = "vitexp.optim.warmup_cosine.WarmupCosine"
