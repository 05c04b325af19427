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

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from toolkit.card import ModelCard
from toolkit.data import Dataset, load_dataset
from toolkit.errors import DataError, ExportError, NoSpaceError, UsageError, VerificationError
from toolkit.fileio import COMPANION_SUFFIXES, artifact_size, os_error, recover, staging_dir, swap_in
from toolkit.names import EXPORT_FORMATS, EXPORT_PRECISIONS
from toolkit.runtime.base import Runner

from .verify import Tolerances, VerifyReport, verify

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
    """Calibration of an int8 (Q/DQ) ONNX: images, how many, how ranges are estimated."""

    dataset: Dataset | None = None
    size: int = 512
    method: str = "minmax"
    activations: str = "u8"

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

    if job.int8.dataset is None:  # fail before the slow export
        raise UsageError("int8 needs calibration images (--calib-dataset)")
    fp32 = path.with_name(f".{path.name}.fp32.onnx")
    try:
        onnx_export.export(job.model, job.card, fp32, opset=o.opset, dynamic=o.dynamic,
                           batch_size=o.batch_size, precision="fp32")
        return quantize.quantize(fp32, job.card, path, job.int8.dataset, calib_size=job.int8.size,
                                 method=job.int8.method, activations=job.int8.activations)
    finally:
        fp32.unlink(missing_ok=True)


def _write_torchscript(job: ExportJob, path: Path) -> Path:
    from . import torchscript

    return torchscript.export(job.model, job.card, path)


TORCHSCRIPT = FormatSpec("torchscript", _write_torchscript)
ONNX = FormatSpec("onnx", build_onnx, EXPORT_PRECISIONS, uses_onnx=True)
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


def aside_path(output: Path) -> Path:
    """model.int8.onnx -> model.int8.failed-verify.onnx; model_repo -> model_repo.failed-verify."""
    if output.suffix and not output.is_dir():
        return output.with_name(f"{output.stem}.{FAILED_TAG}{output.suffix}")
    return output.with_name(f"{output.name}.{FAILED_TAG}")


# --- where the output goes --------------------------------------------------------------------

def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
        if _same_file(destination, checkpoint):
            raise UsageError(f"the output {destination} is the input checkpoint; choose another -o")
    elif destination.exists() and not destination.is_dir():
        raise UsageError(f"{destination} is a file; --format needs a folder (a model repository) there")
    return destination


def _check_not_input(target: Path, checkpoint: Path) -> None:
    """Publishing to `target` must not replace or delete the checkpoint (itself, or a folder holding it)."""
    if _same_file(target, checkpoint):
        raise UsageError(f"the output {target} is the input checkpoint; choose another -o")
    if target.is_dir() and not target.is_symlink():
        try:
            checkpoint.resolve().relative_to(target.resolve())
        except ValueError:
            return
        raise UsageError(f"the output {target} holds the input checkpoint {checkpoint}; choose another -o")


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


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _publish_entry(entry: Path, target: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        if target.exists() and not target.is_dir():
            raise ExportError(f"{target} is a file; refusing to replace it with a folder")
        swap_in(entry, target)
    else:
        if target.is_dir() and not target.is_symlink():
            raise ExportError(f"{target} is a folder; refusing to replace it with a file")
        os.replace(entry, target)


def _publish(staging: Path, artifact: Path, checkpoint: Path, passed: bool) -> Path:
    """Move what the writer staged into place (companions first, the artifact last), or aside."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == artifact.name)
    for entry in entries:
        _check_not_input(artifact.parent / entry.name, checkpoint)
    if passed:
        for entry in entries:
            _publish_entry(entry, artifact.parent / entry.name)
        return artifact
    if len(entries) == 1 and entries[0].name == artifact.name:
        aside = aside_path(artifact)
        _check_not_input(aside, checkpoint)
        _publish_entry(entries[0], aside)
        return aside
    # several files that name each other: keep them together in one folder
    aside = artifact.with_name(f"{artifact.name}.{FAILED_TAG}")
    _check_not_input(aside, checkpoint)
    if os.path.lexists(aside):
        _remove(aside)
    os.replace(staging, aside)
    return aside / artifact.name


def _publish_model_folder(staging: Path, artifact: Path, repository: Path, checkpoint: Path,
                          passed: bool) -> Path:
    """A model folder goes into the repository by one exchange; a failed one to a sibling repository."""
    _check_not_input(artifact, checkpoint)
    built = staging / artifact.name
    if passed:
        _publish_entry(built, artifact)
        return artifact
    aside_repository = repository.with_name(f"{repository.resolve().name}.{FAILED_TAG}")
    aside = aside_repository / artifact.name
    _check_not_input(aside, checkpoint)
    aside_repository.mkdir(exist_ok=True)
    _publish_entry(built, aside)
    return aside


def run_export(checkpoint: str | Path, fmt: str, output: str | Path | None = None, *, precision: str = "fp32",
               opset: int | None = None, batch_size: int = 1, dynamic: bool = True,
               calib_dataset: str | Dataset | None = None, data_dir: str | Path | None = None,
               calib_size: int = 512, calib_method: str = "minmax",
               verify_dataset: str | Dataset | None = None,
               do_verify: bool = True, tolerances: Tolerances | None = None, verify_samples: int = 512,
               device: str = "cpu", arch: str | None = None, allow_pickle: bool = False,
               options: Iterable[Any] = (), **extras: Any) -> ExportResult:
    """Export `checkpoint` to `fmt` and verify it. A failed check returns `ok=False` with the artifact
    aside (`.check()` raises VerificationError; the CLI exits 1); bad input raises a ToolkitError
    before anything is written.

    Format-specific settings come as option dataclasses (`options=[TritonOptions(name="x")]`) or as
    their field names (`name="x", max_batch=16`, as the CLI passes them).
    """
    import shutil
    import time

    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.registry import detect_format
    from toolkit.runtime.torch_runner import TorchRunner, build_from_checkpoint

    started = time.perf_counter()
    spec = format_spec(fmt)
    if precision not in EXPORT_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(EXPORT_PRECISIONS)}")
    if precision not in spec.precisions:
        raise UsageError(f"--format {fmt} supports precision {', '.join(spec.precisions)}, not {precision}")
    if precision == "int8" and calib_dataset is None:
        raise UsageError("--precision int8 needs calibration images: add --calib-dataset "
                         "sample|cifar10|cifar100|folder (with --data-dir)")
    typed = parse_options(fmt, spec.options, extras, options)
    if opset is None:  # int8: DequantizeLinear needs opset 19 in onnx's ReferenceEvaluator
        opset = INT8_OPSET if precision == "int8" else OnnxOptions.opset
    onnx_options = OnnxOptions(opset=opset, dynamic=dynamic, batch_size=batch_size)
    int8 = Int8Options(size=calib_size, method=calib_method)
    if spec.uses_onnx:
        from .onnx import check_opset

        check_opset(opset)
    if detect_format(checkpoint) != "checkpoint":
        raise UsageError(f"{checkpoint} is already an exported {detect_format(checkpoint)} artifact; "
                         "export needs the training checkpoint (.pt .pth .ckpt .safetensors)")
    checkpoint = Path(checkpoint)
    destination = resolve_output(checkpoint, spec, output, precision)
    staging: Path | None = None
    if spec.model_folder is None:
        _check_not_input(destination, checkpoint)
        staging = staging_dir(destination, STAGING_KIND)  # unwritable places fail here, before slow work
    try:
        ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
        model, card, _ = build_from_checkpoint(ckpt, arch=arch)
        if precision == "int8":
            int8 = Int8Options(dataset=_dataset(calib_dataset, data_dir, "train"), size=int8.size,
                               method=int8.method)
        job = ExportJob(checkpoint=checkpoint, model=model, card=card, output=destination,
                        precision=precision, device=device, onnx=onnx_options, int8=int8, options=typed)
        if spec.model_folder is not None:
            job.output = artifact = destination / spec.model_folder(job)
            _check_not_input(artifact, checkpoint)
            try:
                recover(artifact)  # a swap killed between its renames: put the old model back first
            except OSError as exc:
                raise os_error(exc, destination) from None
            staging = staging_dir(artifact, STAGING_KIND)
        else:
            artifact = destination
        assert staging is not None
        try:
            written = spec.write(job, staging / artifact.name)
            report = None
            if do_verify:
                source = verify_dataset if verify_dataset is not None else calib_dataset
                checks = _dataset(source, data_dir, "test")
                reference = TorchRunner(model, card, source=str(checkpoint), device="cpu")
                with spec.open(written, job) as runner:
                    report = verify(runner, reference, checks, precision, tolerances, limit=verify_samples)
            passed = report is None or report.passed
            if spec.model_folder is not None:
                final = _publish_model_folder(staging, artifact, destination, checkpoint, passed)
            else:
                final = _publish(staging, artifact, checkpoint, passed)
        except NoSpaceError:  # raised about the private staging folder: name the place the user chose
            raise NoSpaceError(f"no space left on {artifact.parent}") from None
        except OSError as exc:
            raise os_error(exc, artifact.parent) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(format=fmt, precision=precision, path=final, card=card,
                        seconds=time.perf_counter() - started, verify=report)


__all__ = ["COMPANION_SUFFIXES", "ExportJob", "ExportResult", "FormatSpec", "Int8Options", "OnnxOptions",
           "TensorRTOptions", "build_onnx", "default_output", "format_spec", "run_export"]
