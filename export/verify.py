"""Parity check of an exported artifact against eager PyTorch, on real images when there are any.

fp32 artifacts must match elementwise: |a - r| <= atol + rtol * |r| (numpy's allclose rule, atol
1e-4 on logits; rtol absorbs the larger logits of deep random-init nets).

fp16 and int8 are judged as users judge them: by accuracy, on labelled images the calibration never
saw. Both models answer the same images; McNemar's exact test on the paired right/wrong answers
(toolkit/compare.py) asks whether the reduced-precision model is wrong more often than chance allows.
A significant loss fails; a loss within noise passes. Top-1 agreement and max |diff| are reported but
not gated: on real data many images sit near a decision boundary, so a quantised model that keeps
its accuracy still flips a percent or two of answers in both directions (issue 18: a ResNet-56 at
98.4 % agreement lost 0.15 points). `min_agreement` and `max_accuracy_drop` gate on top, when asked.
Without labels for the model's classes accuracy cannot be measured, and only a floor on agreement
(`UNLABELLED_MIN_AGREEMENT`) catches a broken artifact.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from toolkit.compare import ALPHA, McNemar, format_p, mcnemar_exact
from toolkit.data import Dataset
from toolkit.errors import DataError, UsageError
from toolkit.evaluate import collect_logits
from toolkit.runtime.base import Runner

DEFAULT_SAMPLES = 512
NOISE_SAMPLES = 64
UNLABELLED_MIN_AGREEMENT = 0.9  # a floor against broken artifacts, only where accuracy is unknown


@dataclass(frozen=True)
class Tolerances:
    """fp32: the elementwise tolerance. fp16/int8: the significance level of McNemar's test; the
    agreement and accuracy-drop gates are opt-in (None: reported, not gated)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    alpha: float = ALPHA
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None


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
    mcnemar: McNemar | None = None  # fp16/int8 on labelled images: fp32 (A) vs the artifact (B)
    held_out: int = 0  # calibration images kept out of the verification images

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.artifact_accuracy is None:
            return None
        return self.reference_accuracy - self.artifact_accuracy

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy_drop"] = self.accuracy_drop
        data["mcnemar"] = self.mcnemar.to_dict() if self.mcnemar is not None else None
        return data

    def summary(self) -> str:
        parts = []
        if self.accuracy_drop is not None:
            parts.append(f"accuracy {self.reference_accuracy:.2%} -> {self.artifact_accuracy:.2%}")
        if self.mcnemar is not None:
            parts.append(f"McNemar exact p = {format_p(self.mcnemar.p_value)}")
        parts += [f"top-1 agreement {self.top1_agreement:.2%}", f"max |diff| {self.max_abs_diff:.2e}",
                  f"mean |diff| {self.mean_abs_diff:.2e}"]
        verdict = "passed" if self.passed else "FAILED"
        held = " held-out" if self.held_out else ""
        return f"{verdict} on {self.num_samples}{held} {self.inputs} images: " + ", ".join(parts)


def verification_inputs(dataset: Dataset | None, card: Any, limit: int = DEFAULT_SAMPLES,
                        seed: int = 0) -> Dataset:
    """The given dataset, else the bundled sample, else seeded noise images; at most `limit` (drawn
    class-balanced, as `--limit` draws), labels kept only when they can be aligned to the model's classes."""
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
    dataset = dataset.subset(limit, seed)
    try:
        return dataset.aligned_to(card.class_names)
    except DataError:  # other classes than the model's: agreement still means something, accuracy does not
        return Dataset(dataset.name, dataset.class_names, None, dataset.images, dataset.paths,
                       sampling=dataset.sampling, positions=dataset.positions)


def without_calibration(dataset: Dataset, calibration_ids: Collection[str]) -> Dataset:
    """`dataset` without the images calibration used (matched by `Dataset.ids`); none left is a UsageError."""
    taken = set(calibration_ids)
    if not taken:
        return dataset
    keep = [i for i, name in enumerate(dataset.ids()) if name not in taken]
    if not keep:
        raise UsageError(f"all {len(dataset)} images of {dataset.name} were used for int8 calibration, so "
                         "none are left to verify on: lower --calib-size or verify on another dataset")
    return dataset if len(keep) == len(dataset) else dataset.take(keep)


def _judge_reduced(correct_ref: np.ndarray | None, correct_art: np.ndarray | None, agreement: float,
                   tol: Tolerances) -> tuple[list[str], McNemar | None]:
    """fp16/int8: a significant accuracy loss fails (McNemar); the opt-in gates add theirs."""
    failures: list[str] = []
    test = None
    if correct_ref is not None and correct_art is not None:
        test = mcnemar_exact(correct_ref, correct_art, tol.alpha)
        ref_acc, art_acc = float(correct_ref.mean()), float(correct_art.mean())
        if test.significant and art_acc < ref_acc:
            failures.append(f"accuracy drops {100 * (ref_acc - art_acc):.2f} points ({ref_acc:.2%} -> "
                            f"{art_acc:.2%}), more than noise: McNemar exact p = {format_p(test.p_value)} "
                            f"< {tol.alpha:g}")
        if tol.max_accuracy_drop is not None and ref_acc - art_acc > tol.max_accuracy_drop + 1e-12:
            failures.append(f"accuracy drops {100 * (ref_acc - art_acc):.2f} points "
                            f"(allowed {100 * tol.max_accuracy_drop:.2f})")
    floor, why = tol.min_agreement, ""
    if floor is None and test is None:
        floor, why = UNLABELLED_MIN_AGREEMENT, " (no labels of the model's classes to judge accuracy by)"
    if floor is not None and agreement < floor:
        failures.append(f"top-1 agreement {agreement:.2%} is below {floor:.2%}{why}")
    return failures, test


def verify(artifact: Runner, reference: Runner, dataset: Dataset | None, precision: str,
           tolerances: Tolerances | None = None, *, limit: int = DEFAULT_SAMPLES, batch_size: int = 64,
           seed: int = 0, exclude: Collection[str] = ()) -> VerifyReport:
    """Run both runners on the same preprocessed images and judge the artifact by its precision.

    `exclude`: ids (`Dataset.ids`) of images the artifact was calibrated on; they are removed before
    the verification images are drawn, so the check never sees them."""
    tol = tolerances or Tolerances()
    source = without_calibration(dataset, exclude) if dataset is not None else None
    data = verification_inputs(source, reference.card, limit, seed)
    ref = collect_logits(reference, data, batch_size)
    out = collect_logits(artifact, data, batch_size)
    diff = np.abs(out.astype(np.float64) - ref)
    agreement = float((out.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0
    correct_ref = correct_art = None
    if data.labels is not None:
        correct_ref, correct_art = ref.argmax(1) == data.labels, out.argmax(1) == data.labels
    failures = [] if np.isfinite(out).all() else ["the artifact produced NaN or inf logits"]
    test = None
    if precision == "fp32":
        excess = diff - (tol.atol + tol.rtol * np.abs(ref))
        if (excess > 0).any():
            failures.append(f"logits differ by up to {diff.max():.2e} "
                            f"(allowed {tol.atol:g} + {tol.rtol:g}*|ref|)")
    else:
        reduced, test = _judge_reduced(correct_ref, correct_art, agreement, tol)
        failures += reduced
    return VerifyReport(
        precision=precision, inputs=data.name, num_samples=len(data),
        max_abs_diff=float(diff.max(initial=0.0)), mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=agreement,
        reference_accuracy=None if correct_ref is None else float(correct_ref.mean()),
        artifact_accuracy=None if correct_art is None else float(correct_art.mean()), tolerances=tol,
        passed=not failures, failures=failures, mcnemar=test,
        held_out=0 if dataset is None or source is None else len(dataset) - len(source),
    )
