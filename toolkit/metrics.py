"""A mergeable confusion matrix and the classification metrics derived from it.

Everything a classification report needs is a function of the (true, predicted) count matrix plus
top-k hit counts, so partial results (batches, shards, remote workers) merge by addition and the
final numbers never depend on how the data was split. Definitions follow scikit-learn exactly,
with `zero_division=0`:

- per class: precision = tp / predicted, recall = tp / support, f1 = 2 tp / (2 tp + fp + fn);
  0 where the denominator is 0;
- averages run over the classes that occur in the labels or the predictions (scikit-learn's
  default `labels=unique_labels(y_true, y_pred)`); "weighted" weights by support; "micro" pools
  the counts (in single-label multiclass it equals accuracy);
- top-k: the true class is among the k highest scores, ties broken as `top_k_accuracy_score`
  breaks them (equal scores: the higher class index ranks first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError

AVERAGES = ("macro", "micro", "weighted")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the top `k` scores (scikit-learn's tie order)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 0
    true_score = scores[np.arange(len(labels)), labels][:, None]
    higher = (scores > true_score).sum(1)
    # Among equal scores scikit-learn's reversed stable argsort ranks the higher index first.
    later = np.arange(scores.shape[1])[None, :] > labels[:, None]
    tied_before = ((scores == true_score) & later).sum(1)
    return int(((higher + tied_before) < k).sum())


class ConfusionMatrix:
    """Counts `matrix[true, predicted]` plus top-k hits; add batches, merge shards, read metrics."""

    def __init__(self, num_classes: int, top_k: Sequence[int] = (5,)) -> None:
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        # top-k is only meaningful when there are more than k classes to choose among.
        self.top_k = tuple(sorted({int(k) for k in top_k if 1 <= k <= num_classes}))
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.topk_counts: dict[int, int] = {k: 0 for k in self.top_k}
        self.topk_samples = 0  # samples that came with scores (top-k needs them)

    # --- accumulation ---------------------------------------------------------------------

    def _check_labels(self, values: np.ndarray, what: str) -> np.ndarray:
        values = np.asarray(values).reshape(-1)
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"{what} must be integer class indices, got {values.dtype}")
        values = values.astype(np.int64, copy=False)
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
            raise InputError(f"{what} outside 0..{self.num_classes - 1}")
        return values

    def add(self, labels: np.ndarray, predictions: np.ndarray) -> ConfusionMatrix:
        """Count one batch of (true, predicted) pairs. Returns self, for chaining."""
        labels = self._check_labels(labels, "labels")
        predictions = self._check_labels(predictions, "predictions")
        if labels.shape != predictions.shape:
            raise InputError(f"{len(labels)} labels but {len(predictions)} predictions")
        flat = np.bincount(labels * self.num_classes + predictions, minlength=self.num_classes ** 2)
        self.matrix += flat.reshape(self.num_classes, self.num_classes)
        return self

    def add_scores(self, labels: np.ndarray, scores: np.ndarray) -> ConfusionMatrix:
        """Count one batch from scores/logits (N, classes): argmax predictions and top-k hits."""
        scores = np.asarray(scores)
        labels = self._check_labels(labels, "labels")
        if scores.ndim != 2 or scores.shape != (len(labels), self.num_classes):
            raise InputError(f"scores must be shaped ({len(labels)}, {self.num_classes}), got {scores.shape}")
        self.add(labels, scores.argmax(1))
        for k in self.top_k:
            self.topk_counts[k] += topk_hits(scores, labels, k)
        self.topk_samples += len(labels)
        return self

    @classmethod
    def from_predictions(cls, labels: np.ndarray, predictions: np.ndarray, num_classes: int | None = None,
                         scores: np.ndarray | None = None, top_k: Sequence[int] = (5,)) -> ConfusionMatrix:
        """Build from whole arrays; `num_classes` defaults to the largest index seen + 1."""
        labels = np.asarray(labels)
        predictions = np.asarray(predictions)
        if num_classes is None:
            num_classes = scores.shape[1] if scores is not None else int(
                max(labels.max(initial=-1), predictions.max(initial=-1)) + 1)
        cm = cls(max(num_classes, 1), top_k=top_k)
        if scores is not None:
            cm.add_scores(labels, scores)
            if not np.array_equal(np.asarray(scores).argmax(1), predictions):
                raise InputError("predictions are not the argmax of the scores")
        else:
            cm.add(labels, predictions)
        return cm

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding both sets of counts (the inputs are unchanged)."""
        if other.num_classes != self.num_classes or other.top_k != self.top_k:
            raise InputError(f"cannot merge a {other.num_classes}-class matrix (top-k {other.top_k}) into a "
                             f"{self.num_classes}-class one (top-k {self.top_k})")
        out = ConfusionMatrix(self.num_classes, self.top_k)
        out.matrix = self.matrix + other.matrix
        out.topk_counts = {k: self.topk_counts[k] + other.topk_counts[k] for k in self.top_k}
        out.topk_samples = self.topk_samples + other.topk_samples
        return out

    __add__ = merge

    # --- metrics ----------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return int(self.matrix.sum())

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix).copy()

    @property
    def support(self) -> np.ndarray:
        return self.matrix.sum(1)

    @property
    def predicted(self) -> np.ndarray:
        return self.matrix.sum(0)

    @property
    def accuracy(self) -> float:
        return float(_safe_divide(np.trace(self.matrix), self.num_samples))

    def topk_accuracy(self, k: int) -> float | None:
        """Share of samples whose label is among the top k scores; None when not tracked."""
        if k not in self.topk_counts or self.topk_samples == 0:
            return None
        return self.topk_counts[k] / self.topk_samples

    @property
    def top5(self) -> float | None:
        return self.topk_accuracy(5)

    def per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """precision, recall, f1 (float64) and support (int64), one entry per class."""
        tp, support, predicted = self.true_positives, self.support, self.predicted
        precision = _safe_divide(tp, predicted)
        recall = _safe_divide(tp, support)
        f1 = _safe_divide(2 * tp, support + predicted)  # 2tp / (2tp + fp + fn)
        return precision, recall, f1, support

    def present(self) -> np.ndarray:
        """Classes that occur in the labels or the predictions (the ones averages run over)."""
        return (self.support > 0) | (self.predicted > 0)

    def average(self, kind: str) -> dict[str, float]:
        """{"precision", "recall", "f1"} averaged as `average=kind` in scikit-learn."""
        if kind not in AVERAGES:
            raise InputError(f"unknown average {kind!r}; choose one of {', '.join(AVERAGES)}")
        mask = self.present()
        if kind == "micro":
            tp = self.true_positives[mask].sum()
            predicted, support = self.predicted[mask].sum(), self.support[mask].sum()
            p, r = _safe_divide(tp, predicted), _safe_divide(tp, support)
            f = _safe_divide(2 * tp, predicted + support)
            return {"precision": float(p), "recall": float(r), "f1": float(f)}
        precision, recall, f1, support = (v[mask] for v in self.per_class())
        if not mask.any():
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        if kind == "macro":
            return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
        total = support.sum()
        if total == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        weights = support / total
        return {"precision": float(precision @ weights), "recall": float(recall @ weights),
                "f1": float(f1 @ weights)}

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The metric keys of `eval --json` (accuracy, top5, averages, per_class, confusion_matrix)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise InputError(f"{len(names)} class names for a {self.num_classes}-class matrix")
        precision, recall, f1, support = self.per_class()
        return {
            "accuracy": self.accuracy,
            "top5": self.top5,
            **{kind: self.average(kind) for kind in AVERAGES},
            "per_class": [
                {"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                 "f1": float(f1[i]), "support": int(support[i])}
                for i in range(self.num_classes)
            ],
            "confusion_matrix": self.matrix.tolist(),
            "num_samples": self.num_samples,
        }

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ConfusionMatrix) and self.num_classes == other.num_classes
                and np.array_equal(self.matrix, other.matrix) and self.topk_counts == other.topk_counts
                and self.topk_samples == other.topk_samples)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, samples={self.num_samples})"
