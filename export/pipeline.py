"""checkpoint -> model + card -> export -> verify -> publish, for every format.

Plugging in a format
--------------------
`toolkit.names.EXPORT_FORMATS` maps a format name to the "module:attribute" of a `FormatSpec`,
imported only when that format is asked for (the CLI's `--format` choices come from the same
list). A spec is::

    FormatSpec(
        artifact: str,
            # the artifact-format registry entry (toolkit/runtime/registry.py) this writes: its
            # suffixes name the default output, its reader backends verify it, its Triton platform
        write: Callable[[ExportJob, Path], Path],
            # write the artifact at the given path (its name is the final name, inside a private
            # staging folder: put companions beside it) and return that path;
            # `build_onnx(job, path)` makes the (fp32/fp16/int8 Q/DQ) ONNX to start from
        precisions: tuple[str, ...] = ("fp32",),
        options: tuple[type, ...] = (),
            # the option dataclasses it takes; `run_export(**extras)` fills them by field name, and
            # a name no dataclass has is a UsageError listing the valid ones
        uses_onnx: bool = False,     # --opset is checked before any slow work
        model_folder: Callable[[ExportJob], str] | None = None,
            # for formats written INTO a folder (a Triton repository): the artifact is the folder
            # <output>/<model_folder(job)>/ and nothing else in <output> is touched
        open_runner: Callable[[Path, ExportJob], Runner] | None = None,
            # default: the artifact format's first reader backend, on job.device
        default_name: Callable[[str], str] | None = None,
            # precision -> name ending; default "<stem>[.<precision>]<first suffix>"
    )

A new format is then its module (the spec and its writer) and one line in `EXPORT_FORMATS` (plus a
registry entry when it is a new kind of file); `tests/test_export_pipeline.py` proves it.

What `run_export` guarantees about the files around the output
---------------------------------------------------------------
- `-o` naming an existing folder means "inside it": `<folder>/<stem><suffix>`; a folder is never
  replaced by a file, and the output is never the input checkpoint (any path to the same inode, a
  hard link, or a model folder that holds it): that is a UsageError before any work.
- Work happens in `.<name>.export-<pid>-<random>` beside the destination (same filesystem, so the
  result is renamed into place); a killed export's leftovers are removed by the next export to the
  same place, never a live one's.
- Files are published by rename (companions first, the artifact last); a model folder by an atomic
  exchange (or two renames, repaired by the next run if killed between them): the destination holds
  the old artifact or the new one, never a mix.
- When verification fails, the artifact goes aside as `<name>.failed-verify<suffix>` (a Triton model
  into `<repository>.failed-verify/`), never over a good one; `ExportResult.check()` raises
  VerificationError.
- A full disk is one NoSpaceError ("no space left on <path>"), with nothing partial left behind.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from toolkit import fileio
from toolkit.card import ModelCard
from toolkit.data import Dataset, load_dataset
from toolkit.errors import DataError, ExportError, NoSpaceError, UsageError, VerificationError
from toolkit.fileio import COMPANION_SUFFIXES, artifact_size
from toolkit.names import EXPORT_FORMATS, EXPORT_PRECISIONS, ONNX_PRECISIONS
from toolkit.runtime.base import Runner

from .torchscript import PRECISIONS as TORCHSCRIPT_PRECISIONS
from .verify import Tolerances, VerifyReport, verify, without_calibration

if TYPE_CHECKING:  # pragma: no cover
    from toolkit.card_layers import CardFlags

FAILED_TAG = "failed-verify"
STAGING_KIND = "export"
INT8_OPSET = 19  # default opset of int8 exports (the reference evaluator runs DequantizeLinear from 19)
T = TypeVar("T")


# --- typed options ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX graph is traced (every format but TorchScript starts from it)."""

    opset: int = 18
    dynamic: bool = True
    batch_size: int = 1  # the fixed batch of a --static export

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Int8Options:
    """Calibration of an int8 (Q/DQ) ONNX: the images drawn from, how many, how ranges are estimated."""

    dataset: Dataset | None = None
    size: int = 512
    method: str = "minmax"
    activations: str = "u8"
    seed: int = 0

    @functools.cached_property
    def calibration(self) -> Dataset:
        """The images calibration uses, drawn once: the quantiser reads these, verification holds them out."""
        from .quantize import select_calibration

        if self.dataset is None:
            raise UsageError("int8 needs calibration images (--calib-dataset)")
        return select_calibration(self.dataset, self.size, self.seed)

    def __post_init__(self) -> None:
        from toolkit.names import CALIB_METHODS

        if self.method not in CALIB_METHODS:
            raise UsageError(f"unknown calibration method {self.method!r}; "
                             f"choose one of {', '.join(CALIB_METHODS)}")
        if self.size < 1:
            raise UsageError(f"--calib-size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class TensorRTOptions:
    """The engine's optimisation profile and builder settings (also Triton's plan models)."""

    min_batch: int = 1
    opt_batch: int | None = None
    max_batch: int | None = None  # default: max(32, --batch-size)
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.workspace_gb <= 0:
            raise UsageError(f"--workspace-gb must be positive, got {self.workspace_gb}")


def parse_options(fmt: str, kinds: Iterable[type], given: Mapping[str, Any],
                  typed: Iterable[Any] = ()) -> tuple[Any, ...]:
    """One instance per option dataclass of a format, from flat names (`max_batch=16`) and/or ready
    instances; a name no dataclass of the format has is a UsageError naming the valid ones."""
    kinds = tuple(kinds)
    ready = {type(option): option for option in typed}
    stray = [type(o).__name__ for o in ready.values() if type(o) not in kinds]
    valid = {f.name: kind for kind in kinds for f in fields(kind)}
    unknown = sorted(set(given) - set(valid)) + stray
    if unknown:
        raise UsageError(f"--format {fmt} does not take {', '.join(unknown)}; valid options: "
                         f"{', '.join(sorted(valid)) or 'none'}")
    built = []
    for kind in kinds:
        values = {f.name: given[f.name] for f in fields(kind) if f.name in given}
        base = ready.get(kind)
        defaults = {f.name: getattr(base, f.name) for f in fields(kind)} if base is not None else {}
        built.append(kind(**{**defaults, **values}))
    return tuple(built)


@dataclass
class ExportJob:
    """Everything a format writer may need. Format-specific settings are typed: `job.option(Kind)`."""

    checkpoint: Path
    model: Any  # eval-mode torch.nn.Module
    card: ModelCard
    output: Path  # where the artifact goes (for a model folder: <repository>/<name>)
    precision: str = "fp32"
    device: str = "cpu"
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    int8: Int8Options = field(default_factory=Int8Options)
    options: tuple[Any, ...] = ()  # instances of the format's option dataclasses

    def option(self, kind: type[T]) -> T:
        """This job's `kind` options (the defaults when the format declared none were given)."""
        for option in self.options:
            if isinstance(option, kind):
                return option
        return kind()

    @property
    def opset(self) -> int:
        return self.onnx.opset

    @property
    def dynamic(self) -> bool:
        return self.onnx.dynamic

    @property
    def batch_size(self) -> int:
        return self.onnx.batch_size


# --- format specs -----------------------------------------------------------------------------

def artifact_format(name: str) -> Any:
    """The registry's entry for artifact format `name`: suffixes, Triton platform, reader backends."""
    from toolkit.runtime.registry import FORMATS

    if name not in FORMATS:
        raise ExportError(f"artifact format {name!r} is not in toolkit/runtime/registry.py FORMATS")
    return FORMATS[name]


@dataclass(frozen=True)
class FormatSpec:
    artifact: str
    write: Callable[[ExportJob, Path], Path]
    precisions: tuple[str, ...] = ("fp32",)
    options: tuple[type, ...] = ()
    uses_onnx: bool = False
    model_folder: Callable[[ExportJob], str] | None = None
    open_runner: Callable[[Path, ExportJob], Runner] | None = None
    default_name: Callable[[str], str] | None = None

    @property
    def reader(self) -> Any:
        return artifact_format(self.artifact)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.reader.readers)

    @property
    def triton_platform(self) -> str | None:
        return self.reader.triton_platform

    def suffix(self, precision: str) -> str:
        """The default output's name ending: ".onnx", ".int8.onnx", ".ts", "_triton_fp16", ..."""
        if self.default_name is not None:
            return self.default_name(precision)
        suffixes = tuple(self.reader.suffixes)
        if not suffixes:
            raise ExportError(f"artifact format {self.artifact} declares no file suffix")
        return suffixes[0] if precision == "fp32" else f".{precision}{suffixes[0]}"

    def open(self, path: Path, job: ExportJob) -> Runner:
        if self.open_runner is not None:
            return self.open_runner(path, job)
        from toolkit.runtime.registry import backend_class

        return backend_class(self.backends[0]).open(path, device=job.device)


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
        return artifact_size(self.path)

    def check(self) -> ExportResult:
        """Raise VerificationError (exit 1) when the artifact failed its parity check; else self."""
        if not self.ok:
            reasons = "; ".join(self.verify.failures) if self.verify else ""
            raise VerificationError(f"verification failed ({reasons}); the artifact was kept aside as "
                                    f"{self.path}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "format": self.format, "precision": self.precision, "path": str(self.path),
                "size_bytes": self.size_bytes, "seconds": round(self.seconds, 3),
                "verify": self.verify.to_dict() if self.verify else None, "card": self.card.to_dict()}


# --- the built-in formats ---------------------------------------------------------------------

def build_onnx(job: ExportJob, path: Path) -> Path:
    """The ONNX for `job.precision` at `path`: fp32/fp16 directly, int8 as Q/DQ from an fp32 export."""
    from . import onnx as onnx_export

    o = job.onnx
    if job.precision != "int8":
        return onnx_export.export(job.model, job.card, path, opset=o.opset, dynamic=o.dynamic,
                                  batch_size=o.batch_size, precision=job.precision)
    from . import quantize

    int8 = job.int8
    calibration = int8.calibration  # fails before the slow export when there are no images
    fp32 = path.with_name(f".{path.name}.fp32.onnx")
    try:
        onnx_export.export(job.model, job.card, fp32, opset=o.opset, dynamic=o.dynamic,
                           batch_size=o.batch_size, precision="fp32")
        return quantize.quantize_selected(fp32, job.card, path, calibration, method=int8.method,
                                          activations=int8.activations, seed=int8.seed)
    finally:
        fp32.unlink(missing_ok=True)


def _write_torchscript(job: ExportJob, path: Path) -> Path:
    from . import torchscript

    return torchscript.export(job.model, job.card, path, job.precision)


TORCHSCRIPT = FormatSpec("torchscript", _write_torchscript, TORCHSCRIPT_PRECISIONS)
ONNX = FormatSpec("onnx", build_onnx, ONNX_PRECISIONS, uses_onnx=True)
_LOADED: dict[str, FormatSpec] = {}


def format_spec(name: str) -> FormatSpec:
    """The spec registered under `name` in toolkit.names.EXPORT_FORMATS (imported on first use)."""
    reference = EXPORT_FORMATS.get(name)
    if reference is None:
        raise UsageError(f"unknown export format {name!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if _LOADED.get(reference) is None:
        module_name, attribute = reference.split(":")
        try:
            _LOADED[reference] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ExportError(f"--format {name} is not available in this installation ({exc})") from None
    return _LOADED[reference]


def default_output(checkpoint: str | Path, fmt: str, precision: str = "fp32") -> Path:
    """Beside the checkpoint: model.pt -> model.onnx, model.int8.onnx, model.ts, ..."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + format_spec(fmt).suffix(precision))


# --- where the output goes --------------------------------------------------------------------

def aside_path(output: Path) -> Path:
    """model.int8.onnx -> model.int8.failed-verify.onnx; model_repo -> model_repo.failed-verify."""
    return fileio.aside_path(output, FAILED_TAG)


def resolve_output(checkpoint: Path, spec: FormatSpec, output: str | Path | None, precision: str) -> Path:
    """The file (or, for model-folder formats, the repository folder) the export writes.

    An existing folder given to a file format means "inside it"; a folder is never replaced by a
    file, and the checkpoint is never overwritten.
    """
    if output is None:
        destination = checkpoint.with_name(checkpoint.stem + spec.suffix(precision))
    else:
        destination = Path(output)
        if spec.model_folder is None and destination.is_dir():
            destination = destination / (checkpoint.stem + spec.suffix(precision))
    if spec.model_folder is None:
        if destination.is_dir():
            raise UsageError(f"{destination} is a folder; name a file, or a folder to put "
                             f"{checkpoint.stem}{spec.suffix(precision)} in")
        fileio.check_not_input(destination, checkpoint)
    elif destination.exists() and not destination.is_dir():
        raise UsageError(f"{destination} is a file; --format needs a folder (a model repository) there")
    return destination


# --- the settings every export shares ---------------------------------------------------------

@dataclass(frozen=True)
class ExportSettings:
    """What every export takes besides its format's own options. `run_export(**flat)` fills it by field
    name (the CLI's flag names), or takes a ready one as `settings=`."""

    precision: str = "fp32"
    device: str = "cpu"
    arch: str | None = None
    allow_pickle: bool = False
    data_dir: str | Path | None = None  # where dataset names below are read from
    # how the ONNX graph is traced
    opset: int | None = None  # default: OnnxOptions.opset; INT8_OPSET for int8
    batch_size: int = 1
    dynamic: bool = True
    # int8 calibration
    calib_dataset: str | Dataset | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    # verification
    do_verify: bool = True
    verify_dataset: str | Dataset | None = None  # default: calib_dataset's test split, else the sample
    verify_samples: int = 512
    tolerances: Tolerances | None = None

    def onnx_options(self) -> OnnxOptions:
        opset = self.opset if self.opset is not None else INT8_OPSET if self.precision == "int8" else None
        return OnnxOptions(batch_size=self.batch_size, dynamic=self.dynamic,
                           **({"opset": opset} if opset is not None else {}))


SETTING_NAMES = frozenset(f.name for f in fields(ExportSettings))


@dataclass
class ExportPlan:
    """Phase 1's answer (`resolve`): every input checked and every dataset found before a byte is written."""

    checkpoint: Path
    format: str
    spec: FormatSpec
    settings: ExportSettings
    destination: Path  # the file, or for model-folder formats the repository
    onnx: OnnxOptions
    int8: Int8Options
    options: tuple[Any, ...]  # the format's own option instances
    checks: Dataset | None  # the verification images before calibration's are held out
    card_flags: CardFlags | Mapping[str, Any] | None = None


def _dataset(name: str | Dataset | None, data_dir: str | Path | None, split: str) -> Dataset | None:
    if name is None or isinstance(name, Dataset):
        return name
    try:
        return load_dataset(name, data_dir, split)
    except DataError:
        if split == "train":  # a CIFAR folder holding only the test batch still calibrates
            return load_dataset(name, data_dir, "test")
        raise


def _check_precision(fmt: str, spec: FormatSpec, settings: ExportSettings) -> None:
    precision = settings.precision
    if precision not in EXPORT_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(EXPORT_PRECISIONS)}")
    if precision not in spec.precisions:
        raise UsageError(f"--format {fmt} supports precision {', '.join(spec.precisions)}, not {precision}")
    if precision == "int8" and settings.calib_dataset is None:
        raise UsageError("--precision int8 needs calibration images: add --calib-dataset "
                         "sample|cifar10|cifar100|folder (with --data-dir)")


def resolve(checkpoint: str | Path, fmt: str, output: str | Path | None = None, *,
            settings: ExportSettings | None = None, options: Iterable[Any] = (),
            card_flags: CardFlags | Mapping[str, Any] | None = None, **flat: Any) -> ExportPlan:
    """Phase 1: check every setting, find the checkpoint, the destination and the images (calibration's
    and verification's); a ToolkitError here means nothing was written."""
    from toolkit.runtime.registry import require_checkpoint

    spec = format_spec(fmt)
    chosen = replace(settings or ExportSettings(), **{k: v for k, v in flat.items() if k in SETTING_NAMES})
    _check_precision(fmt, spec, chosen)
    format_flat = {k: v for k, v in flat.items() if k not in SETTING_NAMES}
    typed = parse_options(fmt, spec.options, format_flat, options)
    onnx_options = chosen.onnx_options()
    if spec.uses_onnx:
        from .onnx import check_opset

        check_opset(onnx_options.opset)
    path = require_checkpoint(checkpoint, doing="export")
    destination = resolve_output(path, spec, output, chosen.precision)
    calibrate = chosen.precision == "int8"
    images = _dataset(chosen.calib_dataset, chosen.data_dir, "train") if calibrate else None
    int8 = Int8Options(dataset=images, size=chosen.calib_size, method=chosen.calib_method)
    source = chosen.verify_dataset if chosen.verify_dataset is not None else chosen.calib_dataset
    checks = _dataset(source, chosen.data_dir, "test") if chosen.do_verify else None
    if checks is not None and calibrate:  # none left to verify on: say so before the slow work
        without_calibration(checks, int8.calibration.ids())
    return ExportPlan(checkpoint=path, format=fmt, spec=spec, settings=chosen, destination=destination,
                      onnx=onnx_options, int8=int8, options=typed, checks=checks, card_flags=card_flags)


# --- build, verify, publish ---------------------------------------------------------------------

def build(plan: ExportPlan) -> ExportJob:
    """Phase 2: the eager model and its card from the checkpoint (the card flags merged in), as a job."""
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    s = plan.settings
    ckpt = load_checkpoint(plan.checkpoint, allow_pickle=s.allow_pickle)
    model, card, _ = build_from_checkpoint(ckpt, arch=s.arch, card_flags=plan.card_flags)
    job = ExportJob(checkpoint=plan.checkpoint, model=model, card=card, output=plan.destination,
                    precision=s.precision, device=s.device, onnx=plan.onnx, int8=plan.int8,
                    options=plan.options)
    if plan.spec.model_folder is not None:
        job.output = plan.destination / plan.spec.model_folder(job)
    return job


def verify_artifact(plan: ExportPlan, job: ExportJob, written: Path) -> VerifyReport | None:
    """Phase 3: the artifact against the eager model, on images calibration never saw (None: --no-verify)."""
    if not plan.settings.do_verify:
        return None
    from toolkit.runtime.torch_runner import TorchRunner

    reference = TorchRunner(job.model, job.card, source=str(plan.checkpoint), device="cpu")
    calibrated_on = job.int8.calibration.ids() if job.precision == "int8" else ()
    with plan.spec.open(written, job) as runner:
        return verify(runner, reference, plan.checks, job.precision, plan.settings.tolerances,
                      limit=plan.settings.verify_samples, exclude=calibrated_on)


def publish(plan: ExportPlan, staging: Path, artifact: Path, passed: bool) -> Path:
    """Phase 4: the staged artifact into place, or aside when it failed verification (toolkit/fileio.py)."""
    if plan.spec.model_folder is not None:
        return fileio.publish_model_folder(staging, artifact, plan.destination, plan.checkpoint,
                                           passed=passed, aside_tag=FAILED_TAG)
    return fileio.publish_staged(staging, artifact, plan.checkpoint, passed=passed, aside_tag=FAILED_TAG)


def _model_folder_staging(plan: ExportPlan, artifact: Path) -> Path:
    """A model folder's staging, once its name is known; a swap killed between its renames is undone first."""
    fileio.check_not_input(artifact, plan.checkpoint)
    try:
        fileio.recover(artifact)
    except OSError as exc:
        raise fileio.os_error(exc, plan.destination) from None
    return fileio.staging_dir(artifact, STAGING_KIND)


def run_export(checkpoint: str | Path, fmt: str, output: str | Path | None = None, *,
               settings: ExportSettings | None = None, options: Iterable[Any] = (),
               card_flags: CardFlags | Mapping[str, Any] | None = None, **flat: Any) -> ExportResult:
    """Export `checkpoint` to `fmt` and verify it: resolve -> build -> verify -> publish.

    A failed check returns `ok=False` with the artifact aside (`.check()` raises VerificationError; the
    CLI exits 1); bad input raises a ToolkitError before anything is written. `flat` keywords are
    `ExportSettings` fields (`precision="int8", calib_dataset="sample"`) or the format's own options
    (`name="x", max_batch=16`, as the CLI passes them); `options` takes ready option instances
    (`[TritonOptions(name="x")]`). `card_flags` override card fields of the checkpoint (flag > card >
    preset), so the artifact carries the merged card.
    """
    import shutil
    import time

    started = time.perf_counter()
    plan = resolve(checkpoint, fmt, output, settings=settings, options=options, card_flags=card_flags, **flat)
    staging: Path | None = None
    try:
        if plan.spec.model_folder is None:  # unwritable places fail here, before the slow work
            staging = fileio.staging_dir(plan.destination, STAGING_KIND)
        job = build(plan)
        if staging is None:
            staging = _model_folder_staging(plan, job.output)
        try:
            written = plan.spec.write(job, staging / job.output.name)
            report = verify_artifact(plan, job, written)
            final = publish(plan, staging, job.output, passed=report is None or report.passed)
        except NoSpaceError:  # raised about the private staging folder: name the place the user chose
            raise NoSpaceError(f"no space left on {job.output.parent}") from None
        except OSError as exc:
            raise fileio.os_error(exc, job.output.parent) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(format=fmt, precision=plan.settings.precision, path=final, card=job.card,
                        seconds=time.perf_counter() - started, verify=report)


__all__ = ["COMPANION_SUFFIXES", "ExportJob", "ExportPlan", "ExportResult", "ExportSettings", "FormatSpec",
           "Int8Options", "OnnxOptions", "TensorRTOptions", "build", "build_onnx", "default_output",
           "format_spec", "publish", "resolve", "run_export", "verify_artifact"]
