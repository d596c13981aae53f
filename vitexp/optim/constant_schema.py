"""`schedule=constant`: the warmup-cosine schedule with neither, so the optimizer's rate at
every step (no option sets these keys: the schema holds them)."""

from dataclasses import dataclass

from vitexp.optim.schema import ScheduleConfig


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    _target_: str = "vitexp.optim.warmup_cosine.WarmupCosine"
    warmup_fraction: float = 0.0
    warmup_lr: float = 0.0
    final_lr: float | None = None
