"""Evaluate's matching of a data set's classes to the model's."""

import numpy as np
import pytest

from vitexp.data import DataError, ImageData
from vitexp.tools.evaluate import model_labels


def data_of(names: list[str], labels: list[int]) -> ImageData:
    x = np.zeros((len(labels), 2, 2, 1), np.uint8)
    return ImageData(x, np.array(labels), x, np.array(labels), class_names=names, source="folder")


def test_labels_follow_the_class_names_not_their_order():
    run_classes = ["ant", "bee", "cat", "dog"]
    same = data_of(run_classes, [0, 3, 1])
    np.testing.assert_array_equal(model_labels(run_classes, same), [0, 3, 1])
    subset = data_of(["cat", "ant"], [0, 1, 0])  # a folder of two of the classes, its own order
    np.testing.assert_array_equal(model_labels(run_classes, subset), [2, 0, 2])
    unnamed = data_of(["x", "y"], [1, 0])  # a run that recorded no names keeps the data's order
    np.testing.assert_array_equal(model_labels(["0", "1"], unnamed), [1, 0])


def test_classes_the_model_does_not_know_fail_in_one_line():
    with pytest.raises(DataError, match=r"classes \['zebra'\] are not among the model's"):
        model_labels(["ant", "bee"], data_of(["ant", "zebra"], [0, 1]))
