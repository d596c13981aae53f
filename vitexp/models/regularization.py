"""Random regularisers with a seed of their own per instance: dropout and stochastic depth."""

import random

import keras
import numpy as np
from keras import layers, ops

from vitexp.models.registration import register


def draw_seed(seed: int | None) -> int:
    """A layer's own seed: `seed`, or the next draw from the run's seed.

    `keras.utils.set_random_seed(trainer.seed)` seeds Python's generator, so each random
    layer of a model gets a distinct seed, in build order, that follows from the run's seed.
    """
    return int(seed) if seed is not None else random.randint(1, 2**31 - 1)


class RandomStateMixin:
    """Saves a random layer's generator state with its weights.

    Keras keeps a `SeedGenerator`'s state out of `.keras` files, so a run resumed from a
    checkpoint would replay the masks of its first epochs; with the state saved it draws
    the masks an uninterrupted run would have drawn. Checkpoints without it still load.
    """

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.seed_generator is not None:
            store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if self.seed_generator is not None and store is not None and "seed_state" in store:
            self.seed_generator.state.assign(np.asarray(store["seed_state"]))


@register
class Dropout(RandomStateMixin, layers.Dropout):
    """Keras' `Dropout`, with a mask that costs half the random bits under TensorFlow.

    TensorFlow's dropout draws a 32-bit number per element and turns it into a float; on
    the CPU that is most of the cost of a ViT's attention dropout (5.3 million weights per
    block at batch 64). Here each 32-bit draw gives two elements 16 bits each, compared
    as integers: ~2x cheaper forward and backward. The drop rate is realised to 1/65536
    (0.1 becomes 6554/65536) and kept values are scaled by the realised keep probability,
    so the expectation is unchanged. Other backends, and a `noise_shape`, use Keras' own.
    Without a `seed`, each instance draws its own from the run's seed (`draw_seed`).
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(rate, noise_shape=noise_shape, seed=draw_seed(seed), **kwargs)
        if not hasattr(self, "seed_generator"):  # rate 0 builds none
            self.seed_generator = None

    def call(self, inputs, training=False):
        if (
            not training
            or not 0 < self.rate < 1
            or self.noise_shape is not None
            or keras.backend.backend() != "tensorflow"
        ):
            return super().call(inputs, training=training)
        import tensorflow as tf

        threshold = min(round(self.rate * 65536), 65535)
        keep = 1.0 - threshold / 65536
        seed = keras.random.randint((2,), 0, 2**31 - 1, dtype="int32", seed=self.seed_generator)
        shape = tf.shape(inputs)
        last = inputs.shape[-1]
        draws = tf.random.stateless_uniform(
            tf.concat([shape[:-1], [((last or shape[-1]) + 1) // 2]], axis=0),
            seed,
            minval=None,
            maxval=None,
            dtype=tf.uint32,
        )
        bits = tf.reshape(tf.bitcast(draws, tf.uint16), tf.concat([shape[:-1], [-1]], axis=0))
        if last is None or last % 2:
            bits = bits[..., : shape[-1]]
        zero = tf.zeros((), inputs.dtype)  # broadcast by the select: no tensor of zeros
        return tf.where(bits >= threshold, inputs * tf.cast(1.0 / keep, inputs.dtype), zero)


@register
class DropPath(RandomStateMixin, layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample while training.

    Args:
        rate: probability of dropping the branch.
        seed: this layer's seed; None draws one from the run's seed (`draw_seed`), so
            every block drops its own samples.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = draw_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype) < keep
        return x * ops.cast(mask, x.dtype) / ops.cast(keep, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
