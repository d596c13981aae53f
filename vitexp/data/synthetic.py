"""Deterministic, learnable images for tests and demos: each class is a noisy pattern."""

import numpy as np

from vitexp.data import ImageData


def _make(prototypes, count, noise, rng, chunk=2048):
    """Noisy copies of the class prototypes, made in chunks: never a float copy of the set."""
    labels = rng.integers(0, len(prototypes), size=count).astype(np.int32)
    images = np.empty((count, *prototypes.shape[1:]), dtype=np.uint8)
    for start in range(0, count, chunk):
        part = labels[start : start + chunk]
        noisy = prototypes[part] + noise * rng.standard_normal((len(part), *prototypes.shape[1:]))
        images[start : start + chunk] = np.clip(np.rint(noisy * 255), 0, 255)
    return images, labels


def load_synthetic(
    num_classes: int, image_shape: tuple, num_train: int, num_test: int, noise: float, seed: int
) -> ImageData:
    """Images whose class decides a coarse 4x4 pattern, plus Gaussian pixel noise.

    Args:
        num_classes: number of classes (patterns).
        image_shape: `[height, width, channels]`.
        num_train: training images.
        num_test: test images.
        noise: standard deviation of the noise, on a 0-1 pixel scale.
        seed: the same seed gives the same images.
    """
    height, width, channels = image_shape
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.1, 0.9, size=(num_classes, 4, 4, channels))
    rows, cols = np.arange(height) * 4 // height, np.arange(width) * 4 // width
    prototypes = coarse[:, rows][:, :, cols]
    train = _make(prototypes, num_train, noise, rng)
    test = _make(prototypes, num_test, noise, rng)
    names = [f"pattern_{i}" for i in range(num_classes)]
    return ImageData(*train, *test, class_names=names, source=f"synthetic(seed={seed})")
