"""Compare two models on the same images: metrics side by side, where they disagree, and whether the
difference in accuracy is more than noise (McNemar's exact test on the paired outcomes).

The test needs only the two discordant counts (A right & B wrong, A wrong & B right): under "no
difference" each discordant image is a fair coin, so the two-sided p-value is a binomial tail. It is
computed here in pure Python (exact log of the binomial coefficient, then a short sum of ratios), so
the toolkit needs neither scipy nor statsmodels; the tests check it against statsmodels'
`mcnemar(exact=True)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from .evaluate import EvalReport

ALPHA = 0.05
SIDE_BY_SIDE = ("accuracy", "top5", "macro_f1", "weighted_f1", "ece", "mce", "nll", "brier",
                "images_per_second")
LOWER_IS_BETTER = {"ece", "mce", "nll", "brier"}


def binomial_two_sided_p(k: int, n: int) -> float:
    """P-value of the exact two-sided sign test: 2 P(X <= min(k, n-k)), X ~ Binomial(n, 1/2), at most 1."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    m = min(k, n - k)
    if n == 0 or 2 * m == n:
        return 1.0
    # The largest term of the tail is C(n, m) / 2^n; earlier ones shrink by k / (n - k + 1) each step.
    # Exact big-integer C(n, m) while cheap (~0.1 s at n = 100,000); lgamma (~1e-9 relative) beyond.
    log_comb = (math.log(math.comb(n, m)) if n <= 100_000
                else math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1))
    log_top = log_comb - n * math.log(2.0)
    ratio, total = 1.0, 1.0
    for j in range(m, 0, -1):
        ratio *= j / (n - j + 1)
        total += ratio
        if ratio < 1e-17 * total:
            break
    return min(1.0, 2.0 * math.exp(log_top + math.log(total)))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on paired correct/incorrect outcomes of models A and B on the same images."""

    both_right: int
    a_only: int  # A right, B wrong
    b_only: int  # A wrong, B right
    both_wrong: int
    p_value: float
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def verdict(self) -> str:
        """Plain words: "the difference is (not) significant at 0.05"."""
        return f"the difference {'is' if self.significant else 'is not'} significant at {self.alpha:g}"

    def summary(self, a: str = "A", b: str = "B") -> str:
        """One sentence for people: the discordant counts, the p-value and the verdict."""
        return (f"{a} right where {b} is wrong: {self.a_only}; {b} right where {a} is wrong: {self.b_only}; "
                f"McNemar exact p = {format_p(self.p_value)}: {self.verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"both_right": self.both_right, "a_only_right": self.a_only, "b_only_right": self.b_only,
                "both_wrong": self.both_wrong, "discordant": self.a_only + self.b_only,
                "p_value": self.p_value, "alpha": self.alpha, "significant": self.significant,
                "verdict": self.verdict}


def format_p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray, alpha: float = ALPHA) -> McNemar:
    """Exact McNemar test from two boolean arrays (one entry per image, same order)."""
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(both_right=int((a & b).sum()), a_only=a_only, b_only=b_only,
                   both_wrong=int((~a & ~b).sum()), p_value=binomial_two_sided_p(a_only, a_only + b_only),
                   alpha=alpha)


# --- comparing two eval reports ---------------------------------------------------------------------

def _figures(data: dict[str, Any]) -> dict[str, float | None]:
    calibration = data.get("calibration", {})
    return {"accuracy": data["accuracy"], "top5": data["top5"], "macro_f1": data["macro"]["f1"],
            "weighted_f1": data["weighted"]["f1"], "ece": calibration.get("ece"),
            "mce": calibration.get("mce"), "nll": calibration.get("nll"), "brier": calibration.get("brier"),
            "images_per_second": data["images_per_second"]}


@dataclass
class Comparison:
    """Two EvalReports on the same images, B's classes mapped to A's order; `to_dict` is `compare --json`."""

    a: EvalReport
    b: EvalReport
    b_predictions: np.ndarray  # B's predictions as A's class indices
    test: McNemar

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.a.class_names

    @property
    def agreement(self) -> float:
        n = len(self.a.predictions)
        return float((self.a.predictions == self.b_predictions).mean()) if n else 0.0

    def disagreements(self) -> np.ndarray:
        """Indices where the top-1 answers differ; the most confident disagreement (either side) first."""
        differ = np.flatnonzero(self.a.predictions != self.b_predictions)
        strength = np.maximum(self.a.confidences[differ], self.b.confidences[differ])
        return differ[np.argsort(-strength, kind="stable")]

    def disagreement_rows(self) -> list[dict[str, Any]]:
        names, a, b = self.class_names, self.a, self.b
        return [{"index": int(i), "input": a.ids[i], "label": names[int(a.labels[i])],
                 "a_predicted": names[int(a.predictions[i])], "a_confidence": float(a.confidences[i]),
                 "b_predicted": names[int(self.b_predictions[i])], "b_confidence": float(b.confidences[i])}
                for i in self.disagreements()]

    def metrics(self) -> list[dict[str, Any]]:
        """[{"metric", "a", "b", "delta"}] with delta = B - A (None where either is missing)."""
        fa, fb = _figures(self.a.to_dict()), _figures(self.b.to_dict())

        def delta(key: str) -> float | None:
            a, b = fa[key], fb[key]
            return None if a is None or b is None else b - a

        return [{"metric": key, "a": fa[key], "b": fb[key], "lower_is_better": key in LOWER_IS_BETTER,
                 "delta": delta(key)} for key in SIDE_BY_SIDE]

    def per_class(self) -> list[dict[str, Any]]:
        """Per-class precision/recall/F1 of both (B's rows matched to A's by class name) and B - A deltas."""
        rows_b = {row["class"]: row for row in self.b.metrics.to_dict(self.b.class_names)["per_class"]}
        out = []
        for row in self.a.metrics.to_dict(self.a.class_names)["per_class"]:
            other = rows_b[row["class"]]
            entry: dict[str, Any] = {"class": row["class"], "support": row["support"]}
            for key in ("precision", "recall", "f1"):
                entry.update({f"{key}_a": row[key], f"{key}_b": other[key],
                              f"{key}_delta": other[key] - row[key]})
            out.append(entry)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": {"model": self.a.model, "backend": self.a.backend, "precision": self.a.precision},
            "b": {"model": self.b.model, "backend": self.b.backend, "precision": self.b.precision},
            "dataset": self.a.dataset, "sampling": self.a.sampling, "num_samples": len(self.a.predictions),
            "metrics": self.metrics(), "per_class": self.per_class(), "agreement": self.agreement,
            "mcnemar": self.test.to_dict(), "disagreements": self.disagreement_rows(),
        }


def compare_reports(a: EvalReport, b: EvalReport, alpha: float = ALPHA) -> Comparison:
    """Pair two reports on the same images. Class orders may differ; the class sets and labels must not."""
    if a.ids != b.ids:
        raise DataError(f"the two evaluations ran on different images ({len(a.ids)} vs {len(b.ids)})")
    missing = sorted(set(a.class_names) ^ set(b.class_names))
    if missing:
        raise DataError(f"the models do not share their classes (only in one of them: {missing[:10]})")
    to_a = np.array([a.class_names.index(name) for name in b.class_names], dtype=np.int64)
    if not np.array_equal(to_a[b.labels], a.labels):
        raise DataError("the two evaluations disagree on the labels of the same images")
    b_predictions = to_a[b.predictions]
    test = mcnemar_exact(a.predictions == a.labels, b_predictions == a.labels, alpha)
    return Comparison(a=a, b=b, b_predictions=b_predictions, test=test)

