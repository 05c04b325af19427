"""checkpoint -> model + card -> export -> verify -> move into place, for every format.

Plugging in a format
--------------------
`FORMATS` maps a format name to a `FormatSpec`, or to a lazy reference "module:attribute" naming
one (so `export/tensorrt.py` and `export/triton.py` are imported only when asked for). A spec is::

    FormatSpec(
        write: Callable[[ExportJob, Path], Path],
            # write the artifact at the given path (its name is the final destination's name, inside
            # a private staging folder: put sidecars/companions beside it) and return that path;
            # `build_onnx(job, path)` makes the (fp32/fp16/int8 Q/DQ) ONNX to start from
        open_runner: Callable[[Path, ExportJob], Runner],
            # open the written artifact as a Runner for verification (on job.device)
        suffix: Callable[[str], str],
            # precision -> default name ending, e.g. "fp32" -> ".onnx", "int8" -> ".int8.onnx"
        precisions: tuple[str, ...] = ("fp32",),
    )

`run_export` does the rest: loads the checkpoint safely, resolves the card, stages the write in the
destination folder (so an unwritable path fails before any work), verifies against eager PyTorch,
then renames the staged files into place, or aside as `<name>.failed-verify<suffix>` when the
check fails, never over a good artifact.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.card import ModelCard
from toolkit.data import Dataset, load_dataset
from toolkit.errors import DataError, ExportError, UsageError
from toolkit.runtime.base import Runner
from toolkit.runtime.metadata import PRECISIONS

from .verify import Tolerances, VerifyReport, verify

FAILED_TAG = "failed-verify"


@dataclass
class ExportJob:
    """Everything a format writer may need; `options` holds format-specific extras."""

    checkpoint: Path
    model: Any  # eval-mode torch.nn.Module
    card: ModelCard
    output: Path  # final destination
    precision: str = "fp32"
    opset: int = 18
    batch_size: int = 1
    dynamic: bool = True
    calib_dataset: Dataset | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FormatSpec:
    write: Callable[[ExportJob, Path], Path]
    open_runner: Callable[[Path, ExportJob], Runner]
    suffix: Callable[[str], str]
    precisions: tuple[str, ...] = ("fp32",)


@dataclass
class ExportResult:
    format: str
    precision: str
    path: Path  # where the artifact is now (the aside name when verification failed)
    card: ModelCard
    seconds: float
    verify: VerifyReport | None = None

    @property
    def ok(self) -> bool:
        return self.verify is None or self.verify.passed

    @property
    def size_bytes(self) -> int:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        companions = self.path.parent.glob(self.path.name + ".*")
        return self.path.stat().st_size + sum(p.stat().st_size for p in companions if p.is_file())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "format": self.format, "precision": self.precision, "path": str(self.path),
                "size_bytes": self.size_bytes, "seconds": round(self.seconds, 3),
                "verify": self.verify.to_dict() if self.verify else None, "card": self.card.to_dict()}


# --- the built-in formats ---------------------------------------------------------------------

def build_onnx(job: ExportJob, path: Path) -> Path:
    """The ONNX for `job.precision` at `path`: fp32/fp16 directly, int8 as Q/DQ from an fp32 export."""
    from . import onnx as onnx_export

    if job.precision != "int8":
        return onnx_export.export(job.model, job.card, path, opset=job.opset, dynamic=job.dynamic,
                                  batch_size=job.batch_size, precision=job.precision)
    from . import quantize

    if job.calib_dataset is None:  # fail before the slow export
        raise UsageError("int8 needs calibration images (--calib-dataset)")
    fp32 = path.with_name(f".{path.name}.fp32.onnx")
    try:
        onnx_export.export(job.model, job.card, fp32, opset=job.opset, dynamic=job.dynamic,
                           batch_size=job.batch_size, precision="fp32")
        return quantize.quantize(fp32, job.card, path, job.calib_dataset, calib_size=job.calib_size,
                                 method=job.calib_method, activations=job.options.get("activations", "u8"))
    finally:
        fp32.unlink(missing_ok=True)


def _write_torchscript(job: ExportJob, path: Path) -> Path:
    from . import torchscript

    return torchscript.export(job.model, job.card, path)


def _open_backend(backend: str) -> Callable[[Path, ExportJob], Runner]:
    def opener(path: Path, job: ExportJob) -> Runner:
        from toolkit.runtime.registry import backend_class

        return backend_class(backend).open(path, device=job.device)

    return opener


FORMATS: dict[str, FormatSpec | str] = {
    "torchscript": FormatSpec(_write_torchscript, _open_backend("torchscript"), lambda p: ".ts"),
    "onnx": FormatSpec(build_onnx, _open_backend("onnxruntime"),
                       lambda p: ".onnx" if p == "fp32" else f".{p}.onnx", ("fp32", "fp16", "int8")),
    "tensorrt": "export.tensorrt:FORMAT",
    "triton": "export.triton:FORMAT",
}


def format_spec(name: str) -> FormatSpec:
    entry = FORMATS.get(name)
    if entry is None:
        raise UsageError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(entry, str):
        module_name, attribute = entry.split(":")
        try:
            entry = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ExportError(f"--format {name} is not available in this installation ({exc})") from None
        FORMATS[name] = entry
    return entry  # type: ignore[return-value]


def default_output(checkpoint: str | Path, fmt: str, precision: str = "fp32") -> Path:
    """Beside the checkpoint: model.pt -> model.onnx, model.int8.onnx, model.ts, ..."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + format_spec(fmt).suffix(precision))


def aside_path(output: Path) -> Path:
    """model.int8.onnx -> model.int8.failed-verify.onnx; model_repo -> model_repo.failed-verify."""
    if output.suffix and not output.is_dir():
        return output.with_name(f"{output.stem}.{FAILED_TAG}{output.suffix}")
    return output.with_name(f"{output.name}.{FAILED_TAG}")


# --- orchestration ----------------------------------------------------------------------------

def _dataset(name: str | Dataset | None, data_dir: str | Path | None, split: str) -> Dataset | None:
    if name is None or isinstance(name, Dataset):
        return name
    try:
        return load_dataset(name, data_dir, split)
    except DataError:
        if split == "train":  # a CIFAR folder holding only the test batch still calibrates
            return load_dataset(name, data_dir, "test")
        raise


def _staging(output: Path) -> Path:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {output.parent}: {exc.strerror}") from None


def _replace(source: Path, destination: Path) -> None:
    """Rename into place; an existing directory (a Triton model) is swapped, then removed."""
    if destination.is_dir() and not destination.is_symlink():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, destination)


def _publish(staging: Path, output: Path, passed: bool) -> Path:
    entries = sorted(staging.iterdir(), key=lambda p: p.name == output.name)  # companions first, main last
    if passed:
        for entry in entries:
            _replace(entry, output.parent / entry.name)
        return output
    aside = aside_path(output)
    if len(entries) == 1:
        _replace(entries[0], aside)
    else:  # several files that name each other: keep them together in one folder
        aside = output.with_name(f"{output.name}.{FAILED_TAG}")
        if aside.exists():
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
        os.replace(staging, aside)
    return aside


def run_export(checkpoint: str | Path, fmt: str, output: str | Path | None = None, *, precision: str = "fp32",
               opset: int = 18, batch_size: int = 1, dynamic: bool = True,
               calib_dataset: str | Dataset | None = None, data_dir: str | Path | None = None,
               calib_size: int = 512, calib_method: str = "minmax", verify_dataset: str | Dataset | None = None,
               do_verify: bool = True, tolerances: Tolerances | None = None, verify_samples: int = 512,
               device: str = "cpu", arch: str | None = None, allow_pickle: bool = False,
               **options: Any) -> ExportResult:
    """Export `checkpoint` to `fmt` and verify it. A failed check returns `ok=False` with the artifact
    aside (the CLI exits 1); bad input raises a ToolkitError before anything is written."""
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.registry import detect_format
    from toolkit.runtime.torch_runner import TorchRunner, build_from_checkpoint

    started = time.perf_counter()
    spec = format_spec(fmt)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in spec.precisions:
        raise UsageError(f"--format {fmt} supports precision {', '.join(spec.precisions)}, not {precision}")
    if precision == "int8" and calib_dataset is None:
        raise UsageError("--precision int8 needs calibration images: add --calib-dataset sample|cifar10|cifar100|"
                         "folder (with --data-dir)")
    if fmt in ("onnx", "tensorrt", "triton"):
        from .onnx import check_opset

        check_opset(opset)
    if detect_format(checkpoint) != "checkpoint":
        raise UsageError(f"{checkpoint} is already an exported {detect_format(checkpoint)} artifact; "
                         "export needs the training checkpoint (.pt .pth .ckpt .safetensors)")
    destination = Path(output) if output else default_output(checkpoint, fmt, precision)
    staging = _staging(destination)  # unwritable destinations fail here, before any slow work
    try:
        ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
        model, card, _ = build_from_checkpoint(ckpt, arch=arch)
        calib = _dataset(calib_dataset, data_dir, "train") if precision == "int8" else None
        job = ExportJob(checkpoint=Path(checkpoint), model=model, card=card, output=destination,
                        precision=precision, opset=opset, batch_size=batch_size, dynamic=dynamic,
                        calib_dataset=calib, calib_size=calib_size, calib_method=calib_method, device=device,
                        options=options)
        written = spec.write(job, staging / destination.name)
        report = None
        if do_verify:
            checks = _dataset(verify_dataset if verify_dataset is not None else calib_dataset, data_dir, "test")
            reference = TorchRunner(model, card, source=str(checkpoint), device="cpu")
            with spec.open_runner(written, job) as runner:
                report = verify(runner, reference, checks, precision, tolerances, limit=verify_samples)
        final = _publish(staging, destination, report is None or report.passed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(format=fmt, precision=precision, path=final, card=card,
                        seconds=time.perf_counter() - started, verify=report)
