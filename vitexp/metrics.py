"""Scores of predictions: probabilities, loss and top-k accuracy, per class, the k best classes.

Everything here works on numpy arrays of logits or probabilities, so training, evaluation,
prediction and the served model score the same way.
"""

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed stably (the largest logit is subtracted)."""
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def score_predictions(probs: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 of predicted probabilities."""
    top5 = np.argsort(probs, axis=-1)[:, -5:]
    return {
        "loss": float(-np.log(probs[np.arange(len(y_true)), y_true].clip(1e-12)).mean()),
        "top1": float((probs.argmax(-1) == y_true).mean()),
        "top5": float((top5 == y_true[:, None]).any(-1).mean()),
    }


def score_views(views: np.ndarray, y_true: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Scores of the mean of test-time views' logits ([views, images, classes], view 0 the
    images as they are): `score_predictions`, plus `top1_1view` when there are several views;
    and the probabilities."""
    probs = softmax(views.mean(0).astype(np.float64))
    scores = score_predictions(probs, y_true)
    if len(views) > 1:
        scores["top1_1view"] = float((views[0].argmax(-1) == y_true).mean())
    return scores, probs


def top_k(probs: np.ndarray, class_names: list[str], k: int) -> list[list[dict]]:
    """Per image, the k most probable classes as `{"class", "label", "probability"}`."""
    order = np.argsort(probs, axis=-1)[:, ::-1][:, :k]
    return [
        [{"class": int(c), "label": class_names[c], "probability": float(p[c])} for c in row]
        for p, row in zip(probs, order)
    ]


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy on each class's images; NaN for a class with no images."""
    counts = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_pred == y_true], minlength=num_classes)
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """`(true, predicted)` counts: row `t`, column `p` is how many images of `t` got `p`."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, top: int = 20):
    """The most frequent (true, predicted) mistakes: [(true, pred, count), ...]."""
    counts = confusion_counts(y_true, y_pred, num_classes)
    np.fill_diagonal(counts, 0)
    order = np.argsort(counts, axis=None)[::-1][:top]
    pairs = [(int(i // num_classes), int(i % num_classes)) for i in order]
    return [(t, p, int(counts[t, p])) for t, p in pairs if counts[t, p] > 0]
