"""The learning-rate schedule: linear warmup, then cosine decay (`schedule=warmup_cosine`,
and `schedule=constant` with neither)."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vitexp")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `warmup_lr` to `peak_lr`, then cosine decay to `final_lr`.

    Step `s` is the optimizer's iteration count (0 for the first update). The warmup
    ends at `warmup_steps`, where the rate is `peak_lr`; the decay reaches `final_lr`
    exactly at `total_steps - 1`, the last step trained, and stays there after.
    Graph-safe (no Python branching on the step) and serializable.

    Args:
        peak_lr: the rate at the end of the warmup.
        total_steps: steps in the whole run.
        warmup_fraction: share of the steps spent warming up, in [0, 1).
        warmup_lr: the rate at step 0 when there is a warmup.
        final_lr: the rate at the last step; None keeps `peak_lr` (a constant rate).
    """

    def __init__(self, peak_lr, total_steps, warmup_fraction, warmup_lr, final_lr):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: a schedule needs at least one step")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={warmup_fraction}: use a value in [0, 1)")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_lr = float(warmup_lr)
        self.final_lr = self.peak_lr if final_lr is None else float(final_lr)
        self.warmup_steps = int(self.total_steps * self.warmup_fraction)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warm = self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / warmup
        decay_steps = float(max(self.total_steps - 1 - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        decayed = self.final_lr + (self.peak_lr - self.final_lr) * cosine
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_fraction": self.warmup_fraction,
            "warmup_lr": self.warmup_lr,
            "final_lr": self.final_lr,
        }
