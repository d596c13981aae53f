"""Optimizers and the learning-rate schedule; the trainer fills in what only it knows."""

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

    def __init__(self, peak_lr, total_steps, warmup_fraction=0.1, warmup_lr=0.0, final_lr=0.0):
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


@keras.saving.register_keras_serializable(package="vitexp")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with each dense update done by one fused kernel under TensorFlow.

    Keras writes Adam's update as about ten element-wise ops per variable, each a pass
    over memory; for the textbook ViT's 21 million weights that costs ~65 ms a step on
    two CPU cores. TensorFlow's `ResourceApplyAdam` does the same arithmetic (the same
    bias-corrected step size, moments and epsilon) in one pass: ~27 ms with the weight
    decay. Sparse gradients, AMSGrad and other backends take Keras' path; the weight
    decay, clipping, EMA and loss scaling are Keras' own either way.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=ops.cast(gradient, dtype),
            use_locking=False,
        )


def _ema(ema_momentum):
    return {"use_ema": ema_momentum is not None, "ema_momentum": ema_momentum or 0.99}


def adamw(
    learning_rate,
    weight_decay=1e-4,
    beta_1=0.9,
    beta_2=0.999,
    clipnorm=None,
    ema_momentum=None,
):
    """AdamW (decoupled weight decay); `learning_rate` may be a schedule.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        weight_decay: decoupled weight decay.
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        clipnorm: clip each gradient to this norm; None for no clipping.
        ema_momentum: keep an exponential moving average of the weights (used for
            validation and the saved model); None for off.
    """
    return AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        beta_1=beta_1,
        beta_2=beta_2,
        clipnorm=clipnorm,
        **_ema(ema_momentum),
    )


def sgd(
    learning_rate,
    weight_decay=5e-4,
    momentum=0.9,
    nesterov=True,
    clipnorm=None,
    ema_momentum=None,
):
    """SGD with momentum and decoupled weight decay; `learning_rate` may be a schedule.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        weight_decay: decoupled weight decay.
        momentum: momentum.
        nesterov: use Nesterov momentum.
        clipnorm: clip each gradient to this norm; None for no clipping.
        ema_momentum: keep an exponential moving average of the weights; None for off.
    """
    return keras.optimizers.SGD(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        clipnorm=clipnorm,
        **_ema(ema_momentum),
    )
