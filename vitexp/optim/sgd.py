"""SGD with momentum and decoupled weight decay (`optimizer=sgd`)."""

import keras

from vitexp.optim import ema_arguments


def sgd(learning_rate, weight_decay, momentum, nesterov, clipnorm, ema_momentum):
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
        **ema_arguments(ema_momentum),
    )
