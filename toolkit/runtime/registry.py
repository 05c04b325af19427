"""The one list of backends and artifact formats, and `open_model`: any artifact path or v2 URL -> a Runner.

Plugging in a backend
---------------------
Write its module (a `Runner` subclass with `open(path, *, device, **its options)` and `_infer`), then
add one line to `BACKENDS`: name -> `Backend("module:Class", reads=(formats...))`. The CLI's
`--backend` choices, `open_model` and the formats' reader lists all come from here. Modules are
imported only when used, so opening an ONNX file never imports torch.

`FORMATS` describes the artifact formats: the suffixes that name them, the Triton platform that
serves them, and the function that reads a file's card and facts (`read_artifact`, the one reader:
`toolkit info`, the Triton exporter and the engines use it). Which backends run a format, the first
being the default, follows from `BACKENDS` (`readers(fmt)`). export/pipeline.py's `FormatSpec`s
refer to these by name. Adding a format is one `FORMATS` line, its reader and its backend.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFormatError, UsageError
from ..sniff import sniff_torch

if TYPE_CHECKING:
    from ..artifacts import ArtifactFacts
    from ..card import ModelCard
    from .base import Runner


@dataclass(frozen=True)
class Backend:
    target: str  # "module:Class", imported on first use
    reads: tuple[str, ...]  # artifact formats it runs


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    suffixes: tuple[str, ...]  # lower-case; content decides between torch formats sharing ".pt"
    triton_platform: str | None = None  # config.pbtxt `platform` for a Triton repository
    facts_reader: str | None = None  # "module:function": path -> (card, facts), imported on first use

    @property
    def readers(self) -> tuple[str, ...]:
        return readers(self.name)


# Order matters: the first backend that reads a format is its default.
BACKENDS: dict[str, Backend] = {
    "torch": Backend("toolkit.runtime.torch_runner:TorchRunner", ("checkpoint",)),
    "torchscript": Backend("toolkit.runtime.torchscript_runner:TorchScriptRunner", ("torchscript",)),
    "onnxruntime": Backend("toolkit.runtime.onnxruntime_runner:OnnxRuntimeRunner", ("onnx",)),
    "openvino": Backend("toolkit.runtime.openvino_runner:OpenVINORunner", ("onnx",)),
    "tensorrt": Backend("toolkit.runtime.tensorrt_runner:TensorRTRunner", ("tensorrt",)),
    "pt2": Backend("toolkit.runtime.pt2_runner:ExportedProgramRunner", ("pt2",)),
    "aoti": Backend("toolkit.runtime.aoti_runner:AOTInductorRunner", ("aoti",)),
    "remote": Backend("toolkit.runtime.remote_runner:RemoteRunner", ("remote",)),
}

# Readers of exported files read bytes (toolkit.artifacts, no torch); a checkpoint's card is resolved
# from its weights by the torch backend, which is why that reader lives there.
FORMATS: dict[str, ArtifactFormat] = {
    "checkpoint": ArtifactFormat("checkpoint",
                                 (".pt", ".pth", ".ckpt", ".safetensors", ".th", ".bin", ".tar"),
                                 facts_reader="toolkit.runtime.torch_runner:read_checkpoint"),
    "torchscript": ArtifactFormat("torchscript", (".ts", ".torchscript", ".pt"), "pytorch_libtorch",
                                  facts_reader="toolkit.artifacts:read_torchscript"),
    "onnx": ArtifactFormat("onnx", (".onnx",), "onnxruntime_onnx",
                           facts_reader="toolkit.artifacts:read_onnx"),
    "tensorrt": ArtifactFormat("tensorrt", (".engine", ".plan"), "tensorrt_plan",
                               facts_reader="toolkit.artifacts:read_engine"),
    # both are PT2 archives (.pt2): the content tells them apart (toolkit.pt2_archive)
    "pt2": ArtifactFormat("pt2", (".pt2",), facts_reader="toolkit.pt2_archive:read_pt2"),
    "aoti": ArtifactFormat("aoti", (".aoti.pt2", ".pt2"), facts_reader="toolkit.pt2_archive:read_pt2"),
    "remote": ArtifactFormat("remote", ()),
}
CHECKPOINT_SUFFIXES = FORMATS["checkpoint"].suffixes
TRITON_FOLDER_FORMATS = ("onnx", "tensorrt")  # what a Triton model folder holds (`triton_model_file`)
# Suffixes that name a torch checkpoint only when the content says so (Hugging Face .bin, tarballs...).
CONTENT_CHECKED_SUFFIXES = (".th", ".bin", ".tar")


def readers(fmt: str) -> tuple[str, ...]:
    """The backends that run `fmt`, default first."""
    return tuple(name for name, backend in BACKENDS.items() if fmt in backend.reads)


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


# --- telling formats apart ------------------------------------------------------------------------

def triton_model_file(directory: Path) -> Path:
    """The newest version's model file inside a Triton model directory (or a one-model repository)."""
    if not (directory / "config.pbtxt").is_file():
        models = [d for d in directory.iterdir() if d.is_dir() and (d / "config.pbtxt").is_file()]
        if len(models) != 1:
            raise ModelFormatError(f"{directory}: not a Triton model directory (no config.pbtxt)")
        directory = models[0]
    versions = sorted((d for d in directory.iterdir() if d.is_dir() and d.name.isdigit()),
                      key=lambda d: int(d.name))
    for version in reversed(versions):
        for name in ("model.onnx", "model.plan"):
            if (version / name).is_file():
                return version / name
    raise ModelFormatError(f"{directory}: no <version>/model.onnx or model.plan inside")


def _unknown(path: Path, suffix: str) -> ModelFormatError:
    named = "; ".join(f"{f.name} ({' '.join(f.suffixes)})" for f in FORMATS.values() if f.suffixes)
    return ModelFormatError(f"{path}: unknown model type {suffix or '(no suffix)'}; expected {named}, "
                            "a Triton model directory or an http:// v2 URL")


def detect_format(model: str | Path) -> str:
    """A name of `FORMATS`, from the URL scheme, the folder, the suffix, and for torch files the content."""
    text = str(model)
    if text.startswith(("http://", "https://")):
        return "remote"
    path = Path(model)
    if path.is_dir():  # a Triton model folder, or a timm/transformers one (a checkpoint)
        from ..checkpoint_formats.folders import folder_kind

        if folder_kind(path) != "triton":  # an unknown folder: ModelFormatError saying what was looked for
            return "checkpoint"
        return detect_format(triton_model_file(path))
    if not path.exists():
        raise ModelFormatError(f"model not found: {path}")
    from ..paths import require_file

    require_file(path, error=ModelFormatError, what="model")  # a device or FIFO is refused before any read
    suffix = path.suffix.lower()
    named = [f.name for f in FORMATS.values() if suffix in f.suffixes]
    torch_family = {"checkpoint", "torchscript"}
    if {"pt2", "aoti"} & set(named):  # a torch.export program or an AOTInductor package: by content
        from ..pt2_archive import pt2_format

        return pt2_format(path)
    if named and not set(named) <= torch_family:
        return named[0]
    sniffed = sniff_torch(path) if path.is_file() else None
    if sniffed is not None:
        return sniffed
    if suffix in CONTENT_CHECKED_SUFFIXES:
        raise ModelFormatError(f"{path}: a {suffix} file that is not a PyTorch checkpoint (neither a "
                               "torch.save zip, a pickle, nor safetensors)")
    if named:  # a damaged .pt/.pth/.ts: let its loader say what is wrong
        return "torchscript" if suffix in (".ts", ".torchscript") else "checkpoint"
    raise _unknown(path, suffix)


def require_checkpoint(path: str | Path, *, doing: str) -> Path:
    """`path` as a Path if it is a training checkpoint, else a UsageError saying what it is instead.

    The one check for commands that start from training weights (validate, export, benchmark):
    the accepted suffixes come from `FORMATS`, so a format added there is accepted everywhere.
    """
    fmt = detect_format(path)
    if fmt != "checkpoint":
        suffixes = " ".join(FORMATS["checkpoint"].suffixes)
        article = "an" if fmt[0] in "aeiou" else "a"
        raise UsageError(f"`{doing}` needs a training checkpoint ({suffixes}, or a timm/transformers "
                         f"folder); {path} is {article} {fmt} artifact: use `toolkit info` or "
                         "`toolkit eval` on it")
    return Path(path)


def read_artifact(path: str | Path, fmt: str | None = None) -> tuple[ModelCard, ArtifactFacts]:
    """(card, facts) of any artifact file or Triton model folder, through its format's reader.

    `fmt` skips format detection when the caller knows it. Exported files are read from their bytes
    without torch; checkpoints carry no facts, so theirs are fp32 with the card's I/O.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if path.is_dir() and fmt in TRITON_FOLDER_FORMATS:  # a Triton model folder: its newest model file
        path = triton_model_file(path)
    target = FORMATS[fmt].facts_reader if fmt in FORMATS else None
    if target is None:
        raise ModelFormatError(f"{path}: {fmt} artifacts carry no facts to read")
    read: Callable[[Path], tuple[ModelCard, ArtifactFacts]] = _imported(target)
    return read(path)


def _imported(target: str) -> Any:
    """The object a "module:name" entry of `BACKENDS` or `FORMATS` names, imported now."""
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


# --- opening --------------------------------------------------------------------------------------

def backend_class(name: str) -> type[Runner]:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    cls = _imported(BACKENDS[name].target)
    from .base import Runner

    if not (isinstance(cls, type) and issubclass(cls, Runner)) or "open" not in _defined(cls):
        raise TypeError(f"backend {name}: {BACKENDS[name].target} must be a Runner that implements open()")
    return cls


def _defined(cls: type) -> set[str]:
    """Names defined by `cls` or a base below Runner."""
    from .base import Runner

    return {name for klass in cls.__mro__ if klass is not Runner and issubclass(klass, Runner)
            for name in vars(klass)}


def backend_options(cls: type[Runner]) -> tuple[str, ...]:
    """The keyword options a backend's `open` accepts (besides `device`)."""
    params = inspect.signature(cls.open).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "device")


def open_model(model: str | Path, backend: str = "auto", device: str = "cpu", **options: Any) -> Runner:
    """Open any artifact as a Runner. `options` go to the backend's `open` (e.g. `allow_pickle`, `arch`
    for checkpoints, `hint` for OpenVINO); an option it does not take is a UsageError naming those it does."""
    fmt = detect_format(model)
    allowed = readers(fmt)
    if backend == "auto":
        if not allowed:
            raise ModelFormatError(f"{model}: no installed backend runs {fmt} artifacts")
        backend = allowed[0]
    elif backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    elif backend not in allowed:
        raise UsageError(f"backend {backend} cannot run a {fmt} file; use one of: {', '.join(allowed)}")
    path: str | Path = model if fmt == "remote" else Path(model)
    if isinstance(path, Path) and path.is_dir() and fmt in TRITON_FOLDER_FORMATS:
        path = triton_model_file(path)
    cls = backend_class(backend)
    valid = backend_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(f"backend {backend} takes no option {', '.join(unknown)}; its options are: "
                         f"{', '.join(valid) or 'none'}")
    return cls.open(path, device=device, **options)
