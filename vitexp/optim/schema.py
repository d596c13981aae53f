"""What every optimizer's and schedule's schema holds, and their shared checks.

An optimizer or a schedule is its own files (`vitexp.schema`): its factory, its
`<name>_schema.py` with a subclass of `OptimizerConfig` or `ScheduleConfig`, and its
option `conf/optimizer/<name>.yaml` or `conf/schedule/<name>.yaml`. Both are partial:
the trainer gives the schedule the peak rate and the steps, the optimizer the schedule.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from vitexp.validate import check_range, require


@dataclass
class OptimizerConfig:
    """The keys every optimizer has."""

    _target_: str = MISSING
    _partial_: bool = True
    learning_rate: float = MISSING
    weight_decay: float = MISSING
    clipnorm: float | None = MISSING
    ema_momentum: float | None = MISSING

    @classmethod
    def check(cls, opt: Any) -> None:
        require(
            opt.learning_rate > 0,
            f"optimizer.learning_rate={opt.learning_rate}: use a positive learning rate",
        )
        require(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay}: use >= 0")
        if opt.clipnorm is not None:
            require(opt.clipnorm > 0, "optimizer.clipnorm must be positive or null")
        if opt.ema_momentum is not None:
            check_range("optimizer.ema_momentum", opt.ema_momentum, 0.0, 1.0)


@dataclass
class ScheduleConfig:
    """The keys every schedule has: the rate at step 0, the warmup's share, the last rate."""

    _target_: str = MISSING
    _partial_: bool = True
    warmup_fraction: float = MISSING
    warmup_lr: float = MISSING
    final_lr: float | None = MISSING

    @classmethod
    def check(cls, sched: Any) -> None:
        require(
            0.0 <= sched.warmup_fraction < 1.0,
            f"schedule.warmup_fraction={sched.warmup_fraction}: warmup must be shorter than "
            "training, use a fraction in [0, 1)",
        )
        require(sched.warmup_lr >= 0, "schedule.warmup_lr must be >= 0")
