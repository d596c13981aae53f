"""Scores against values worked by hand: probabilities, loss, top-k, per class, confusions."""

import numpy as np
import pytest

from vitexp.metrics import confused_pairs, per_class_accuracy, score_predictions, score_views, softmax, top_k


def test_confused_pairs_and_scores():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([1, 1, 0, 0, 1, 2])
    assert confused_pairs(y_true, y_pred, 3) == [(0, 1, 2), (1, 0, 1)]
    probs = softmax(np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])))
    metrics = score_predictions(probs, np.array([1, 2]))
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0
    assert metrics["loss"] == pytest.approx(-(np.log(0.2) + np.log(0.6)) / 2)


def test_softmax_is_stable_for_large_logits():
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0, -1000.0]])), [[0.5, 0.5, 0.0]])


def test_top_k_ranks_classes_by_probability():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    ranked = top_k(probs, ["cat", "dog", "eel"], 2)
    assert [[r["label"] for r in row] for row in ranked] == [["dog", "eel"], ["cat", "eel"]]
    assert ranked[0][0] == {"class": 1, "label": "dog", "probability": 0.6}


def test_per_class_accuracy_leaves_absent_classes_undefined():
    accuracy = per_class_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(accuracy[:2], [0.5, 1.0])
    assert np.isnan(accuracy[2])


def test_score_views_averages_the_logits_and_keeps_the_first_view_apart():
    y = np.array([0, 1, 1])
    plain = np.array([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])  # one view: 2 of 3 right
    mirror = np.array([[2.0, 0.0], [0.0, 4.0], [0.0, 1.0]])  # outvotes the wrong one
    (one, one_probs) = score_views(plain[None], y)
    assert one["top1"] == pytest.approx(2 / 3) and "top1_1view" not in one
    both, probs = score_views(np.stack([plain, mirror]), y)
    assert both["top1"] == 1.0 and both["top1_1view"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0)
    assert probs[1, 1] > 0.5 > one_probs[1, 1]
