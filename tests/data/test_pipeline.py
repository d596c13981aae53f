"""The tf.data pipeline: uint8 until batched, exact per-epoch order, resumable."""

import numpy as np
import pytest
import tensorflow as tf

from vitexp.data.pipeline import eval_dataset, predict_views, split_validation, steps_per_epoch, train_dataset

X = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
Y = np.arange(10) % 3


def first_pixels(ds):
    return [batch[0][:, 0, 0, 0].numpy().tolist() for batch in ds]


def test_split_matches_keras_validation_split():
    (tx, ty), (vx, vy) = split_validation(X, Y, 0.2)
    assert len(tx) == 8 and len(vx) == 2
    np.testing.assert_array_equal(vx, X[8:])
    with pytest.raises(ValueError, match="empty split"):
        split_validation(X[:1], Y[:1], 0.2)


def test_train_batches_are_uint8_with_one_hot_labels():
    ds = train_dataset(X, Y, 3, batch_size=4, seed=1, first_epoch=0, epochs=2)
    batches = list(ds)
    assert len(batches) == 2 * steps_per_epoch(10, 4) == 6
    images, labels = batches[0]
    assert images.dtype == tf.uint8 and labels.shape == (4, 3)
    np.testing.assert_array_equal(labels.numpy().sum(1), 1)
    epoch0 = sorted(sum(first_pixels(train_dataset(X, Y, 3, 4, 1, 0, 1)), []))
    assert epoch0 == X[:, 0, 0, 0].tolist()  # each epoch is a permutation of every image


def test_order_depends_on_seed_and_epoch_and_resumes_exactly():
    full = first_pixels(train_dataset(X, Y, 3, 4, seed=7, first_epoch=0, epochs=3))
    again = first_pixels(train_dataset(X, Y, 3, 4, seed=7, first_epoch=0, epochs=3))
    resumed = first_pixels(train_dataset(X, Y, 3, 4, seed=7, first_epoch=2, epochs=3))
    other_seed = first_pixels(train_dataset(X, Y, 3, 4, seed=8, first_epoch=0, epochs=3))
    assert full == again
    assert resumed == full[6:]
    assert full[:3] != full[3:6] and full != other_seed


def test_fixed_steps_per_epoch():
    ds = train_dataset(X, Y, 3, batch_size=4, seed=1, first_epoch=0, epochs=2, steps=5)
    assert len(list(ds)) == 10


def test_eval_dataset_keeps_order():
    ds = eval_dataset(X, Y, 3, batch_size=4)
    assert sum(first_pixels(ds), []) == X[:, 0, 0, 0].tolist()


def test_predict_views_adds_the_mirrored_images_for_flip():
    import keras

    pixels = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten()])  # logits = the pixels
    (one,) = predict_views(pixels, X, Y, 3, batch_size=4, tta="none")
    np.testing.assert_array_equal(one, X.reshape(10, 4))
    views = predict_views(pixels, X, Y, 3, batch_size=4, tta="flip")
    assert views.shape == (2, 10, 4)
    np.testing.assert_array_equal(views[0], X.reshape(10, 4))
    np.testing.assert_array_equal(views[1], X[:, :, ::-1].reshape(10, 4))  # left and right swapped
    assert not np.array_equal(views[0], views[1])


def test_predict_views_adds_one_pixel_shifts_of_both_for_flip_shift():
    import keras

    x = np.arange(1, 2 * 3 * 3 + 1, dtype=np.uint8).reshape(2, 3, 3, 1)  # no pixel is zero
    pixels = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Flatten()])  # logits = the pixels
    views = predict_views(pixels, x, Y[:2], 3, batch_size=2, tta="flip_shift").reshape(10, 2, 3, 3)
    mirror = x[:, :, ::-1, 0]
    np.testing.assert_array_equal(views[0], x[..., 0])
    np.testing.assert_array_equal(views[1], mirror)
    up, down, left, right = views[2:6]  # the image moved by one pixel, zeros moved in
    np.testing.assert_array_equal(up[:, :2], x[:, 1:, :, 0])
    np.testing.assert_array_equal(up[:, 2], 0)
    np.testing.assert_array_equal(down[:, 1:], x[:, :2, :, 0])
    np.testing.assert_array_equal(down[:, 0], 0)
    np.testing.assert_array_equal(left[:, :, :2], x[:, :, 1:, 0])
    np.testing.assert_array_equal(right[:, :, 1:], x[:, :, :2, 0])
    np.testing.assert_array_equal(right[:, :, 0], 0)
    np.testing.assert_array_equal(views[6][:, :2], mirror[:, 1:])  # and the mirror's shifts
    np.testing.assert_array_equal(views[9][:, :, 1:], mirror[:, :, :2])
    assert len({v.tobytes() for v in views}) == 10  # ten different views
