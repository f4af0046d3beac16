"""Classification metrics of the speech-emotion literature, numpy only.

WA (weighted accuracy) is plain accuracy; UAR (unweighted average recall) is
the mean of per-class recalls; macro-F1 the mean of per-class F1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["confusion_matrix", "classification_report", "by_corpus"]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` counts, rows = true class, columns = predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, UAR, macro-F1 and per-class precision / recall / F1 / support.

    Classes absent from ``y_true`` are left out of UAR and macro-F1 (their
    recall is undefined) and reported with support 0.
    """
    cm = confusion_matrix(y_true, y_pred, len(labels))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(float)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = int(support.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "num_examples": total,
        "per_class": {
            lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(support[i])}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }


def by_corpus(clips: Sequence, y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """:func:`classification_report` of each corpus among ``clips`` (the part of the speaker id before its first
    ``-``: ``ravdess-21`` -> ``ravdess``, ``nemo-IC0`` -> ``nemo``; ``""`` for ids without one), by name."""
    corpora = np.array([c.speaker.split("-", 1)[0] if "-" in c.speaker else "" for c in clips])
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    return {name: classification_report(y_true[corpora == name], y_pred[corpora == name], labels)
            for name in sorted(set(corpora.tolist()))}
