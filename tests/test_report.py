"""Report maths: attention rollout against values worked by hand, confusions, test metrics."""

import numpy as np
import pytest

from vitexp.explain import attention_rollout
from vitexp.report import confused_pairs, position_similarity, score_predictions, softmax


def test_rollout_one_layer_without_cls():
    # one head; mixed = 0.5 A + 0.5 I = [[0.75, 0.25], [0.125, 0.875]]; mean of rows
    a = np.array([[[[0.5, 0.5], [0.25, 0.75]]]])
    np.testing.assert_allclose(attention_rollout([a], has_cls=False), [[0.4375, 0.5625]])


def test_rollout_with_cls_averages_heads():
    # heads average to row 0 = [0.2, 0.3, 0.5]; mixed row 0 = [0.6, 0.15, 0.25] -> [0.375, 0.625]
    heads = np.zeros((1, 2, 3, 3))
    heads[0, 0] = [[0.2, 0.2, 0.6], [0, 1, 0], [0, 0, 1]]
    heads[0, 1] = [[0.2, 0.4, 0.4], [0, 1, 0], [0, 0, 1]]
    np.testing.assert_allclose(attention_rollout([heads], has_cls=True), [[0.375, 0.625]])


def test_rollout_two_layers_multiply_in_order():
    a1 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])  # mixed: [[1, 0], [0.5, 0.5]]
    a2 = np.array([[[[0.0, 1.0], [0.0, 1.0]]]])  # mixed: [[0.5, 0.5], [0, 1]]
    # rollout = M2 @ M1 = [[0.75, 0.25], [0.5, 0.5]]; row mean = [0.625, 0.375]
    np.testing.assert_allclose(attention_rollout([a1, a2], has_cls=False), [[0.625, 0.375]])


def test_confused_pairs_and_metrics():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([1, 1, 0, 0, 1, 2])
    assert confused_pairs(y_true, y_pred, 3) == [(0, 1, 2), (1, 0, 1)]
    probs = softmax(np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])))
    metrics = score_predictions(probs, np.array([1, 2]))
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0
    assert metrics["loss"] == pytest.approx(-(np.log(0.2) + np.log(0.6)) / 2)


def test_position_similarity():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    sims = position_similarity(emb)
    np.testing.assert_allclose(np.diag(sims), 1.0)
    assert sims[0, 1] == pytest.approx(0.0) and sims[0, 2] == pytest.approx(np.sqrt(0.5))
