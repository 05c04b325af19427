"""Validation report: what the weights are, whether they load, whether they are healthy.

Each check adds a `Problem` (error or warning) instead of stopping, so one run tells the user
everything that is wrong. Only unreadable files end the report early.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .card import ModelCard, load_sidecar
from .card_layers import CardFlags, checkpoint_card
from .checkpoint import (
    ArchInfo,
    LoadedCheckpoint,
    distinct_values,
    fit_report,
    load_checkpoint,
    load_strict,
    resolve_architecture,
)
from .errors import ArchitectureError, CheckpointError, DataError, ModelFormatError

Severity = Literal["error", "warning", "info"]
MAX_LISTED = 10


@dataclass(frozen=True)
class Problem:
    severity: Severity
    code: str
    message: str


@dataclass
class ValidationReport:
    path: str
    valid: bool = False
    arch: str = "unknown"
    num_classes: int = 0
    family: str = "unknown"
    stem: str = "unknown"
    shortcut: str | None = None
    depth: int | None = None
    parameters: int | None = None
    sha256: str = ""
    wrapper: str | None = None
    prefix: str = ""
    layout: str | None = None
    accuracy: float | None = None
    accuracy_samples: int | None = None
    accuracy_sampling: str | None = None  # how --limit chose them (class-balanced, seeded), if it did
    accuracy_device: str | None = None  # where and at what precision the accuracy was measured
    accuracy_precision: str | None = None
    problems: list[Problem] = field(default_factory=list)
    card: ModelCard | None = None
    # the public weights the file was recognised as (publisher, name, published top-1, source)
    recognised: dict[str, Any] | None = None
    # what the training script saved beside the weights (best accuracy, epoch, arch)
    recorded: dict[str, Any] = field(default_factory=dict)

    def add(self, severity: Severity, code: str, message: str) -> None:
        self.problems.append(Problem(severity, code, message))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["card"] = self.card.to_dict() if self.card else None
        data["problems"] = [asdict(p) for p in self.problems]
        return data


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def validate_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    flags: CardFlags | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    min_accuracy: float | None = None,
    allow_pickle: bool = False,
    batch_size: int = 128,
    device: str = "cpu",
    precision: str = "fp32",
) -> ValidationReport:
    """Run every check on a checkpoint. Usage errors (unknown --arch, bad card flags) raise.
    `device`/`precision` are where and how the accuracy gate runs (the torch runner's options)."""
    report = ValidationReport(path=str(path))
    try:
        ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    except (CheckpointError, ArchitectureError, DataError, ModelFormatError) as exc:
        report.add("error", "unreadable", str(exc))
        return report
    _describe_file(ckpt, report)
    try:
        info = resolve_architecture(ckpt.state_dict, arch)
    except ArchitectureError as exc:
        report.add("error", "architecture", str(exc))
        return report
    report.arch, report.num_classes = info.arch, info.num_classes
    report.family, report.stem, report.depth = info.spec.family, info.spec.stem, info.spec.depth
    report.shortcut = info.shortcut
    card = _resolve_card(ckpt, info, flags or CardFlags(), report)

    _check_tensors(ckpt, report)
    model = _strict_load(ckpt, info, report)
    if model is not None:
        report.parameters = sum(p.numel() for p in model.parameters())
        _check_forward(model, card, report)
        if dataset is not None:
            _check_accuracy(model, report, dataset, data_dir, split, limit, min_accuracy, batch_size,
                            device=device, precision=precision)
    report.valid = not report.errors
    return report


def _describe_file(ckpt: LoadedCheckpoint, report: ValidationReport) -> None:
    """How the weights were stored, and what the loader noticed on the way (info, not faults)."""
    report.sha256, report.wrapper = ckpt.sha256, ckpt.wrapper
    report.prefix, report.layout = ckpt.prefix, ckpt.layout
    report.recorded = dict(ckpt.recorded)
    for code, message in ckpt.notes:
        report.add("info", code, message)
    if report.recorded:
        report.add("info", "recorded", f"the file records {recorded_text(report.recorded)}")
    if ckpt.dropped_keys:
        report.add("warning", "dropped_keys",
                   f"keys outside the network were ignored: {_listed(ckpt.dropped_keys)}")
    if ckpt.pickled_module:
        report.add("warning", "pickled_module",
                   "weights came from a whole pickled nn.Module (loaded with --allow-pickle)")


def recorded_text(recorded: dict[str, Any]) -> str:
    """`best_prec1 91.78, epoch 200`: float32 accuracies as a person wrote them, not 91.78000183105469."""
    return ", ".join(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in recorded.items())


def _resolve_card(ckpt: LoadedCheckpoint, info: ArchInfo, flags: CardFlags,
                  report: ValidationReport) -> ModelCard:
    """The card every other command would build (`checkpoint_card`), with its faults as problems."""
    names = flags.fields({}).get("class_names") if flags.classes else None
    if names is not None and len(names) != info.num_classes:
        report.add("error", "head_mismatch", f"the head has {info.num_classes} outputs but --classes "
                   f"{flags.classes} lists {len(names)} classes")
        flags = dataclasses.replace(flags, classes=None)
    sidecar = True
    try:
        stored = ckpt.card or load_sidecar(ckpt.path)
    except DataError as exc:  # a malformed sidecar: report it, judge the weights without it
        report.add("error", "card", f"{ckpt.path.name}.card.json: {exc}")
        stored, sidecar = None, False
    if stored is not None and stored.num_classes != info.num_classes:  # a stale card: the tensors win
        report.add("error", "card_mismatch",
                   f"the card lists {stored.num_classes} classes but the head has {info.num_classes}")
    card, known = checkpoint_card(ckpt, info, flags, sidecar=sidecar)
    report.card = card
    if known is not None:
        report.recognised = known.summary()
        report.add("info", "recognised", f"{known.label}, published top-1 {known.top1:g} % "
                   f"({known.dataset}); "
                   "the card has its publisher's preprocessing unless a flag says otherwise")
    return card


def _check_tensors(ckpt: LoadedCheckpoint, report: ValidationReport) -> None:
    """Numerical health, each test over the values as stored (`distinct_values`), so a view that
    claims 10^11 elements over a few bytes costs a few bytes to scan."""
    import torch

    state = {k: distinct_values(v) for k, v in ckpt.state_dict.items()}
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        report.add("error", "non_finite",
                   f"NaN/Inf values in {len(non_finite)} tensors: {_listed(non_finite)}")
    bn_layers = sorted(k[: -len(".running_var")] for k in state if k.endswith(".running_var"))
    bad_var = [layer for layer in bn_layers if bool((state[f"{layer}.running_var"] <= 0).any())]
    if bad_var:
        report.add("error", "bn_running_var", f"BatchNorm running_var <= 0 in {_listed(bad_var)}")
    untouched = [
        layer for layer in bn_layers
        if f"{layer}.running_mean" in state
        and bool((state[f"{layer}.running_mean"] == 0).all())
        and bool((state[f"{layer}.running_var"] == 1).all())
    ]
    if bn_layers and len(untouched) == len(bn_layers):
        report.add("error", "bn_untrained",
                   "every BatchNorm has running mean 0 and variance 1: these weights were never trained "
                   "or lost their buffers")
    elif untouched:
        report.add("warning", "bn_default_stats",
                   f"BatchNorm running stats never updated in {_listed(untouched)}")
    claimed = ckpt.state_dict
    dead = [k for k, v in state.items()
            if k.endswith(".weight") and claimed[k].ndim in (2, 4) and v.numel() and not bool(v.any())]
    if dead:
        report.add("error", "dead_layer", f"all-zero weights in {len(dead)} layers: {_listed(dead)}")
    dead_bn = [k for k, v in state.items()
               if k.endswith(".weight") and claimed[k].ndim == 1 and f"{k[:-7]}.running_var" in state
               and v.numel() and not bool(v.any())]
    if dead_bn:
        report.add("warning", "zero_bn_gamma",
                   f"BatchNorm scale is all zero (block switched off) in {_listed(dead_bn)}")


def _strict_load(ckpt: LoadedCheckpoint, info: ArchInfo, report: ValidationReport) -> Any:
    """The one strict load (shared with the torch runner): every misfit becomes a problem."""
    from .archs import build_model

    model = build_model(info.arch, info.num_classes, shortcut=info.shortcut)
    fit = fit_report(model.state_dict(), ckpt.state_dict)
    for code, message in fit.problems(listed=MAX_LISTED):
        report.add("error", code, message)
    if not fit.ok:
        return None
    try:
        load_strict(model, ckpt.state_dict)
    except ArchitectureError as exc:
        report.add("error", "load", str(exc))
        return None
    return model.eval()


def _check_forward(model: Any, card: ModelCard, report: ValidationReport) -> None:
    import torch

    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.standard_normal((4, *card.input_size), dtype=np.float32))
    with torch.inference_mode():
        out = model(batch).float()
    if not bool(torch.isfinite(out).all()):
        report.add("error", "forward_non_finite", "a forward pass on random inputs gives NaN/Inf logits")
    elif float((out - out[:1]).abs().max()) < 1e-6:
        report.add("error", "constant_output",
                   "different inputs give identical logits: the network ignores its input")


def _check_accuracy(model: Any, report: ValidationReport, dataset: str, data_dir: str | Path | None,
                    split: str, limit: int | None, min_accuracy: float | None, batch_size: int, *,
                    device: str = "cpu", precision: str = "fp32") -> None:
    from .data import load_dataset
    from .evaluate import collect_logits, top1_accuracy
    from .runtime.torch_runner import TorchRunner

    assert report.card is not None
    data = load_dataset(dataset, data_dir, split).subset(limit)
    try:
        data = data.aligned_to(report.card.class_names)
    except DataError as exc:
        report.add("error", "class_mismatch", str(exc))
        return
    runner = TorchRunner(model, report.card, source=report.path, device=device, precision=precision)
    assert data.labels is not None  # every --dataset is labelled (load_dataset)
    report.accuracy = top1_accuracy(collect_logits(runner, data, batch_size), data.labels)
    report.accuracy_samples, report.accuracy_sampling = len(data), data.sampling
    report.accuracy_device, report.accuracy_precision = runner.device, runner.precision
    if min_accuracy is not None and report.accuracy < min_accuracy:
        report.add("error", "accuracy_below_threshold",
                   f"top-1 accuracy {report.accuracy:.4f} on {len(data)} {data.name} images "
                   f"({runner.precision} on {runner.device}) is below --min-accuracy {min_accuracy}")
