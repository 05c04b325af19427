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
        self.topk_counts: dict[int, int] = dict.fromkeys(self.top_k, 0)
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
        return float(_safe_divide(np.trace(self.matrix), np.asarray(self.num_samples)))

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
            return {"precision": float(precision.mean()), "recall": float(recall.mean()),
                    "f1": float(f1.mean())}
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


# --- calibration ----------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64, stable for any logit range (no log of an underflowed 0)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class Calibration:
    """Can the confidences be trusted? Mergeable sums behind ECE, MCE, NLL and the Brier score.

    Definitions (Guo et al. 2017, as torchmetrics' `MulticlassCalibrationError`):

    - confidence = the top-1 softmax probability; a sample is correct when its argmax is the label;
    - `n_bins` equal-width bins over [0, 1], each closed on the left ([lo, hi)); the last one also
      holds 1.0 (torchmetrics puts an exact 1.0 into a bin of its own);
    - ECE = sum over bins of (count / N) * |accuracy - mean confidence|; MCE = the largest such gap
      over non-empty bins;
    - NLL = mean of -log p(true class), from log-softmax of the logits (scikit-learn's `log_loss`
      without its clipping at 2.2e-16);
    - Brier = mean over samples of sum_k (p_k - onehot_k)^2 (0 best, 2 worst; scikit-learn's
      multiclass `brier_score_loss`).
    """

    def __init__(self, n_bins: int = 15) -> None:
        if n_bins < 1:
            raise InputError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.counts = np.zeros(self.n_bins, dtype=np.int64)
        self.correct = np.zeros(self.n_bins, dtype=np.int64)
        self.confidence_sums = np.zeros(self.n_bins, dtype=np.float64)
        self.nll_sum = 0.0
        self.brier_sum = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_bins + 1)

    def bin_of(self, confidences: np.ndarray) -> np.ndarray:
        """Bin index of each confidence ([lo, hi) bins; 1.0 in the last)."""
        index = np.searchsorted(self.edges, np.asarray(confidences, dtype=np.float64), side="right") - 1
        return np.clip(index, 0, self.n_bins - 1)

    def add_confidences(self, confidences: np.ndarray, correct: np.ndarray) -> Calibration:
        """Count top-1 confidences and whether each prediction was right (the binned part only)."""
        confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
        correct = np.asarray(correct, dtype=bool).reshape(-1)
        if confidences.shape != correct.shape:
            raise InputError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
        if confidences.size and not (np.isfinite(confidences).all() and confidences.min() >= 0
                                     and confidences.max() <= 1):
            raise InputError("confidences must be probabilities in [0, 1]")
        index = self.bin_of(confidences)
        self.counts += np.bincount(index, minlength=self.n_bins)
        self.correct += np.bincount(index, weights=correct, minlength=self.n_bins).astype(np.int64)
        self.confidence_sums += np.bincount(index, weights=confidences, minlength=self.n_bins)
        return self

    def add_logits(self, labels: np.ndarray, logits: np.ndarray) -> Calibration:
        """Count one batch of (labels, logits (N, classes)); probabilities are their softmax."""
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise InputError(f"logits must be shaped (N, classes), got {logits.shape}")
        return self.add_log_probs(labels, log_softmax(logits))

    def add_log_probs(self, labels: np.ndarray, log_probs: np.ndarray) -> Calibration:
        """Count one batch from its log-probabilities (N, classes), for callers that have them already."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if log_probs.ndim != 2 or len(log_probs) != len(labels):
            raise InputError(f"logits must be shaped ({len(labels)}, classes), got {log_probs.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= log_probs.shape[1]):
            raise InputError(f"labels outside 0..{log_probs.shape[1] - 1}")
        probs = np.exp(log_probs)
        rows = np.arange(len(labels))
        predicted = log_probs.argmax(1)
        self.add_confidences(probs[rows, predicted], predicted == labels)
        self.nll_sum += float(-log_probs[rows, labels].sum())
        true_prob = probs[rows, labels]
        self.brier_sum += float(((probs ** 2).sum(1) - 2 * true_prob + 1).sum())
        return self

    def merge(self, other: Calibration) -> Calibration:
        """A new object holding both sets of sums (the inputs are unchanged)."""
        if other.n_bins != self.n_bins:
            raise InputError(f"cannot merge {other.n_bins}-bin calibration into a {self.n_bins}-bin one")
        out = Calibration(self.n_bins)
        out.counts = self.counts + other.counts
        out.correct = self.correct + other.correct
        out.confidence_sums = self.confidence_sums + other.confidence_sums
        out.nll_sum = self.nll_sum + other.nll_sum
        out.brier_sum = self.brier_sum + other.brier_sum
        return out

    __add__ = merge

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def bin_accuracy(self) -> np.ndarray:
        return _safe_divide(self.correct, self.counts)

    def bin_confidence(self) -> np.ndarray:
        return _safe_divide(self.confidence_sums, self.counts)

    def gaps(self) -> np.ndarray:
        """|accuracy - mean confidence| per bin (0 for empty bins)."""
        return np.abs(self.bin_accuracy() - self.bin_confidence())

    @property
    def ece(self) -> float:
        n = self.num_samples
        return float((self.gaps() * self.counts).sum() / n) if n else 0.0

    @property
    def mce(self) -> float:
        filled = self.counts > 0
        return float(self.gaps()[filled].max()) if filled.any() else 0.0

    @property
    def nll(self) -> float | None:
        """None when only confidences were added (NLL and Brier need the full probabilities)."""
        n = self.num_samples
        return self.nll_sum / n if n else None

    @property
    def brier(self) -> float | None:
        n = self.num_samples
        return self.brier_sum / n if n else None

    def to_dict(self) -> dict[str, Any]:
        """The `calibration` object of `eval --json`: the four figures plus the reliability bins."""
        edges, accuracy, confidence = self.edges, self.bin_accuracy(), self.bin_confidence()
        return {
            "ece": self.ece, "mce": self.mce, "nll": self.nll, "brier": self.brier, "n_bins": self.n_bins,
            "bins": [
                {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(self.counts[b]),
                 "accuracy": float(accuracy[b]) if self.counts[b] else None,
                 "confidence": float(confidence[b]) if self.counts[b] else None}
                for b in range(self.n_bins)
            ],
        }

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Calibration) and self.n_bins == other.n_bins
                and np.array_equal(self.counts, other.counts) and np.array_equal(self.correct, other.correct)
                and np.allclose(self.confidence_sums, other.confidence_sums, rtol=1e-12, atol=0))

    def __repr__(self) -> str:
        return f"Calibration(n_bins={self.n_bins}, samples={self.num_samples}, ece={self.ece:.4f})"


def top_confusions(matrix: np.ndarray, class_names: Sequence[str], limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent (true -> predicted) mistakes: count, share of all mistakes, share of the true class.

    Ties: the larger count first, then the true class index, then the predicted one (stable output).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    total = int(errors.sum())
    if total == 0 or limit < 1:
        return []
    support = matrix.sum(1)
    true_idx, pred_idx = np.nonzero(errors)
    counts = errors[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -counts))[:limit]
    return [
        {"true": class_names[true_idx[o]], "predicted": class_names[pred_idx[o]], "count": int(counts[o]),
         "share": int(counts[o]) / total, "true_class_rate": int(counts[o]) / int(support[true_idx[o]])}
        for o in order
    ]


def logits_agreement(reference: np.ndarray, candidate: np.ndarray,
                     labels: np.ndarray | None = None) -> dict[str, Any]:
    """How far `candidate` logits are from `reference` on the same images, as an export's verification
    judges reduced precision: max/mean |diff|, top-1 agreement and, with labels, both accuracies."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise InputError(f"logits to compare must share one (N, classes) shape, got {reference.shape} "
                         f"and {candidate.shape}")
    diff = np.abs(candidate - reference)
    n = len(reference)
    result: dict[str, Any] = {
        "num_samples": n,
        "max_abs_diff": float(diff.max()) if n else 0.0,
        "mean_abs_diff": float(diff.mean()) if n else 0.0,
        "top1_agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()) if n else 1.0,
        "finite": bool(np.isfinite(candidate).all()),
    }
    if labels is not None and n:
        result["reference_accuracy"] = float((reference.argmax(1) == labels).mean())
        result["accuracy"] = float((candidate.argmax(1) == labels).mean())
    return result
