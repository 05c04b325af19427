"""Parity check of an exported artifact against eager PyTorch, on real images when there are any.

fp32 artifacts must match elementwise: |a - r| <= atol + rtol * |r| (numpy's allclose rule, atol
1e-4 on logits; rtol absorbs the larger logits of deep random-init nets). fp16/int8 are judged as
users judge them: top-1 agreement (default >= 99%) and, with labels, accuracy drop (<= 1 point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from toolkit.data import Dataset
from toolkit.errors import DataError
from toolkit.evaluate import collect_logits, top1_accuracy
from toolkit.runtime.base import Runner

DEFAULT_SAMPLES = 512
NOISE_SAMPLES = 64


@dataclass(frozen=True)
class Tolerances:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01


@dataclass
class VerifyReport:
    precision: str
    inputs: str  # where the images came from: a dataset name, or "noise"
    num_samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    reference_accuracy: float | None
    artifact_accuracy: float | None
    tolerances: Tolerances
    passed: bool
    failures: list[str] = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.artifact_accuracy is None:
            return None
        return self.reference_accuracy - self.artifact_accuracy

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy_drop"] = self.accuracy_drop
        return data

    def summary(self) -> str:
        parts = [f"max |diff| {self.max_abs_diff:.2e}", f"mean |diff| {self.mean_abs_diff:.2e}",
                 f"top-1 agreement {self.top1_agreement:.2%}"]
        if self.accuracy_drop is not None:
            parts.append(f"accuracy {self.reference_accuracy:.2%} -> {self.artifact_accuracy:.2%}")
        verdict = "passed" if self.passed else "FAILED"
        return f"{verdict} on {self.num_samples} {self.inputs} images: " + ", ".join(parts)


def verification_inputs(dataset: Dataset | None, card: Any, limit: int = DEFAULT_SAMPLES,
                        seed: int = 0) -> Dataset:
    """The given dataset, else the bundled sample, else seeded noise images; at most `limit`, labels
    kept only when they can be aligned to the model's classes."""
    if dataset is None:
        try:
            from toolkit.data import load_sample

            dataset = load_sample("test")
        except DataError:
            dataset = None
    if dataset is None:
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 256, (NOISE_SAMPLES, card.height, card.width, 3), dtype=np.uint8)
        return Dataset("noise", tuple(card.class_names), None, noise)
    dataset = dataset.subset(limit)
    try:
        return dataset.aligned_to(card.class_names)
    except DataError:  # other classes than the model's: agreement still means something, accuracy does not
        return Dataset(dataset.name, dataset.class_names, None, dataset.images, dataset.paths)


def verify(artifact: Runner, reference: Runner, dataset: Dataset | None, precision: str,
           tolerances: Tolerances | None = None, *, limit: int = DEFAULT_SAMPLES, batch_size: int = 64,
           seed: int = 0) -> VerifyReport:
    """Run both runners on the same preprocessed images and judge the artifact by its precision."""
    tol = tolerances or Tolerances()
    data = verification_inputs(dataset, reference.card, limit, seed)
    ref = collect_logits(reference, data, batch_size)
    out = collect_logits(artifact, data, batch_size)
    diff = np.abs(out.astype(np.float64) - ref)
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    ref_acc = art_acc = None
    if data.labels is not None:
        ref_acc, art_acc = top1_accuracy(ref, data.labels), top1_accuracy(out, data.labels)
    failures = []
    if not np.isfinite(out).all():
        failures.append("the artifact produced NaN or inf logits")
    if precision == "fp32":
        excess = diff - (tol.atol + tol.rtol * np.abs(ref))
        if (excess > 0).any():
            failures.append(f"logits differ by up to {diff.max():.2e} "
                            f"(allowed {tol.atol:g} + {tol.rtol:g}*|ref|)")
    else:
        if agreement < tol.min_agreement:
            failures.append(f"top-1 agreement {agreement:.2%} is below {tol.min_agreement:.2%}")
        if ref_acc is not None and art_acc is not None and ref_acc - art_acc > tol.max_accuracy_drop + 1e-12:
            failures.append(f"accuracy drops {100 * (ref_acc - art_acc):.2f} points "
                            f"(allowed {100 * tol.max_accuracy_drop:.2f})")
    return VerifyReport(
        precision=precision, inputs=data.name, num_samples=len(data), max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()), top1_agreement=agreement, reference_accuracy=ref_acc,
        artifact_accuracy=art_acc, tolerances=tol, passed=not failures, failures=failures,
    )
