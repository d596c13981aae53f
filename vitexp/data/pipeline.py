"""tf.data pipelines over uint8 arrays: exact per-epoch order, batching, augmentation.

Images stay uint8 until they are batched (the model casts them), so a CIFAR-sized set
costs its raw size in memory and nothing more. The training stream is a function of
(seed, epoch): epoch k is shuffled with the stateless seed (seed, k), so a run resumed
at epoch k sees exactly the batches it would have seen.
"""

import numpy as np
import tensorflow as tf

from vitexp.metrics import softmax


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float):
    """Holds out the last `fraction` of the training set, as Keras' `validation_split` does."""
    split_at = int(len(x) * (1.0 - fraction))
    if split_at == 0 or split_at == len(x):
        raise ValueError(
            f"validation_split={fraction} leaves an empty split of {len(x)} images: "
            "use a fraction in (0, 1) that keeps both splits non-empty"
        )
    return (x[:split_at], y[:split_at]), (x[split_at:], y[split_at:])


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)


def _one_hot(num_classes):
    def fn(images, labels):
        return images, tf.one_hot(labels, num_classes, dtype=tf.float32)

    return fn


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    steps: int | None = None,
    augment=None,
    skip: int = 0,
) -> tf.data.Dataset:
    """Batches for epochs `first_epoch .. epochs-1`, each epoch a seeded permutation.

    Args:
        x: uint8 images (N, H, W, C).
        y: int labels (N,).
        num_classes: for the one-hot labels.
        batch_size: images per batch; an epoch ends with a smaller batch if N is not a
            multiple, as with Keras' own handling of arrays.
        seed: the data-order seed.
        first_epoch: the epoch to start at (0, or where a resumed run continues).
        epochs: the last epoch (exclusive).
        steps: batches per epoch; None for one pass over the images.
        augment: an optional batch op `(images, one_hot, seed) -> (images, labels)`
            (see `vitexp.data.augment`); it receives a distinct stateless seed per batch.
        skip: batches of `first_epoch` already trained (a run resumed inside it): the
            stream starts after them, the rest of the epoch unchanged.
    """
    images = tf.constant(x)
    labels = tf.constant(y, dtype=tf.int32)
    count = len(x)

    def gather(idx, batch_seed):
        return tf.gather(images, idx), tf.one_hot(tf.gather(labels, idx), num_classes), batch_seed

    epoch_batches = _epoch_batches(seed, count, batch_size, steps)
    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches).skip(skip).map(gather)
    if augment is None:
        ds = ds.map(lambda images, one_hot, _: (images, one_hot))
    else:
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _epoch_batches(seed: int, count: int, batch_size: int, steps: int | None):
    """`epoch -> (indices, batch seed)` batches: the epoch's seeded permutation of `count` images."""

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=epoch_seed)
        batches = tf.data.Dataset.from_tensor_slices(order)
        if steps is None:
            batches = batches.batch(batch_size)
        else:
            batches = batches.repeat().batch(batch_size).take(steps)
        # each batch carries its own augmentation seed: (seed, epoch) folded with its index
        return batches.enumerate().map(
            lambda i, idx: (idx, tf.random.experimental.stateless_fold_in(epoch_seed, i))
        )

    return epoch_batches


def eval_dataset(x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int) -> tf.data.Dataset:
    """In-order batches of uint8 images and one-hot labels, for validation and test."""
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32))).batch(batch_size)
    return ds.map(_one_hot(num_classes)).prefetch(tf.data.AUTOTUNE)


def predict_views(
    model, x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, tta: str
) -> np.ndarray:
    """The model's logits for each test-time view of the images, shape [views, images, classes].

    `tta="none"`: the images as they are (one view). `"flip"`: the images and their
    horizontal mirrors, for models trained with horizontal flips. `"flip_shift"`: those two
    and each shifted by one pixel up, down, left and right, the pixels moved in zero (10
    views, for models trained with random crops of a zero-padded image). Callers average the
    views' logits; view 0 is always the images as they are.
    """
    views = [x]
    if tta in ("flip", "flip_shift"):
        views.append(x[:, :, ::-1])
    if tta == "flip_shift":
        views += [shift(v, dy, dx) for v in views[:2] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return np.stack(
        [
            model.predict(eval_dataset(np.ascontiguousarray(v), y, num_classes, batch_size), verbose=0)
            for v in views
        ]
    )


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images [n, h, w, c] moved by `dy` rows and `dx` columns, zeros moved in."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def predict_probs(model, x: np.ndarray, tta: str, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of images as a run scores its test split (`score_views`): the
    softmax of the mean of the test-time views' logits (`predict_views`)."""
    views = predict_views(model, x, np.zeros(len(x), np.int32), model.output_shape[-1], batch_size, tta)
    return softmax(views.mean(0).astype(np.float64))
