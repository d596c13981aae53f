"""Batch augmentation ops for the tf.data graph, deterministic under a seed.

Each op is a small registered function `(images, labels, seed) -> (images, labels)` over a
batch: float32 pixels in [0, 255], one-hot (or mixed) labels, and a stateless seed of
shape (2,). Randomness is per sample and comes only from that seed, so a run with a fixed
seed augments identically every time, and a resumed run exactly as the original would.
Keras' preprocessing layers draw from stateful generators in tf.data (not reproducible),
and its RandomCrop uses one offset per batch, hence these. RandAugment is Keras' own
layer: the one op here that is random but not seeded.
"""

from collections.abc import Callable

import tensorflow as tf

Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
OPS: dict[str, Callable[..., Op]] = {}


def register(name: str):
    def wrap(factory):
        OPS[name] = factory
        return factory

    return wrap


def _uniform(seed, shape, low=0.0, high=1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _beta(seed, alpha, shape=()):
    a, b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma(shape, seed=a, alpha=alpha)
    y = tf.random.stateless_gamma(shape, seed=b, alpha=alpha)
    return x / (x + y)


def _crop_boxes(images, y0, x0, h, w):
    """Crops boxes given as fractions of the image and resizes them back to its size."""
    size = tf.shape(images)[1:3]
    boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(tf.shape(images)[0]), size)


@register("random_crop")
def random_crop(padding: int) -> Op:
    """Zero-pads by `padding` pixels and crops back to the original size at a random place."""

    def op(images, labels, seed):
        height, width = images.shape[1], images.shape[2]
        padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        n = tf.shape(images)[0]
        offsets = tf.random.stateless_uniform([n, 2], seed, 0, 2 * padding + 1, dtype=tf.int32)
        ph, pw = height + 2 * padding - 1, width + 2 * padding - 1
        y0 = tf.cast(offsets[:, 0], tf.float32) / ph
        x0 = tf.cast(offsets[:, 1], tf.float32) / pw
        boxes = tf.stack([y0, x0, y0 + (height - 1) / ph, x0 + (width - 1) / pw], axis=1)
        out = tf.image.crop_and_resize(padded, boxes, tf.range(n), [height, width], method="nearest")
        return out, labels

    return op


@register("random_resized_crop")
def random_resized_crop(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> Op:
    """Crops a random box (area share in `scale`, aspect in `ratio`) and resizes it back."""

    def op(images, labels, seed):
        n = tf.shape(images)[0]
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        area = _uniform(s[0], [n], *scale)
        log_ratio = _uniform(s[1], [n], tf.math.log(ratio[0]), tf.math.log(ratio[1]))
        aspect = tf.exp(log_ratio)
        h = tf.minimum(tf.sqrt(area / aspect), 1.0)
        w = tf.minimum(tf.sqrt(area * aspect), 1.0)
        y0 = _uniform(s[2], [n]) * (1.0 - h)
        x0 = _uniform(s[3], [n]) * (1.0 - w)
        return _crop_boxes(images, y0, x0, h, w), labels

    return op


@register("horizontal_flip")
def horizontal_flip() -> Op:
    """Mirrors half of the images left to right."""

    def op(images, labels, seed):
        flip = _uniform(seed, [tf.shape(images)[0]]) < 0.5
        return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images), labels

    return op


@register("rand_augment")
def rand_augment(magnitude: float = 0.5, num_ops: int = 2) -> Op:
    """Keras' RandAugment (two random ops per image at the given magnitude)."""
    import keras

    layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=num_ops, factor=magnitude)

    def op(images, labels, seed):
        return layer(images, training=True), labels

    return op


def _box_mask(seed, n, height, width, area, aspect):
    """Per-sample rectangles (area share, aspect) at random places: 1 inside, 0 outside."""
    h = tf.minimum(tf.sqrt(area / aspect), 1.0) * height
    w = tf.minimum(tf.sqrt(area * aspect), 1.0) * width
    cy, cx = tf.unstack(tf.random.stateless_uniform([2, n], seed), axis=0)
    top, left = cy * (height - h), cx * (width - w)
    rows = tf.range(height, dtype=tf.float32)[None, :, None]
    cols = tf.range(width, dtype=tf.float32)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + w)[:, None, None])
    )
    return tf.cast(inside, tf.float32)[..., None]


@register("random_erasing")
def random_erasing(probability: float, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> Op:
    """With the given probability per image, fills a random rectangle with random pixels."""

    def op(images, labels, seed):
        n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
        area = _uniform(s[0], [n], *scale)
        aspect = tf.exp(_uniform(s[1], [n], tf.math.log(ratio[0]), tf.math.log(ratio[1])))
        mask = _box_mask(s[2], n, height, width, area, aspect)
        mask *= tf.cast(_uniform(s[3], [n]) < probability, tf.float32)[:, None, None, None]
        noise = _uniform(s[4], tf.shape(images), 0.0, 255.0)
        return images * (1.0 - mask) + noise * mask, labels

    return op


@register("mixup")
def mixup(alpha: float) -> Op:
    """Blends each image and label with its neighbour in the batch, weight ~ Beta(alpha, alpha)."""

    def op(images, labels, seed):
        lam = _beta(seed, alpha)
        mixed = lam * images + (1.0 - lam) * tf.roll(images, 1, axis=0)
        return mixed, lam * labels + (1.0 - lam) * tf.roll(labels, 1, axis=0)

    return op


@register("cutmix")
def cutmix(alpha: float) -> Op:
    """Pastes a box from the neighbouring image; labels mix by the pasted area."""

    def op(images, labels, seed):
        n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        cut = 1.0 - _beta(s[0], alpha, [n])
        mask = _box_mask(s[1], n, height, width, cut, tf.ones([n]))
        pasted = tf.reduce_mean(mask, axis=[1, 2, 3])[:, None]
        mixed = images * (1.0 - mask) + tf.roll(images, 1, axis=0) * mask
        return mixed, (1.0 - pasted) * labels + pasted * tf.roll(labels, 1, axis=0)

    return op


def either(first: Op, second: Op) -> Op:
    """Applies one of two ops to the whole batch, each half of the time."""

    def op(images, labels, seed):
        pick, inner = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return tf.cond(
            _uniform(pick, []) < 0.5,
            lambda: first(images, labels, inner),
            lambda: second(images, labels, inner),
        )

    return op


def build_augment(cfg) -> Op | None:
    """The op chain a data config's `augment` section asks for, or None when it asks nothing.

    Order: crop, flip, RandAugment, random erasing, then MixUp/CutMix (one per batch when
    both are on).
    """
    ops: list[Op] = []
    if cfg.random_resized_crop:
        ops.append(OPS["random_resized_crop"]())
    if cfg.random_crop_padding:
        ops.append(OPS["random_crop"](cfg.random_crop_padding))
    if cfg.horizontal_flip:
        ops.append(OPS["horizontal_flip"]())
    if cfg.rand_augment:
        ops.append(OPS["rand_augment"](cfg.rand_augment_magnitude))
    if cfg.random_erasing:
        ops.append(OPS["random_erasing"](cfg.random_erasing))
    mixers = [
        OPS[name](alpha)
        for name, alpha in (("mixup", cfg.mixup_alpha), ("cutmix", cfg.cutmix_alpha))
        if alpha
    ]
    if len(mixers) == 2:
        ops.append(either(*mixers))
    elif mixers:
        ops.append(mixers[0])
    if not ops:
        return None

    def chain(images, labels, seed):
        images = tf.cast(images, tf.float32)
        for i, op in enumerate(ops):
            images, labels = op(images, labels, tf.random.experimental.stateless_fold_in(seed, i))
        return images, labels

    return chain
