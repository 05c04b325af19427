"""`open_model`: any artifact path or v2 URL -> the right Runner, with its card.

Backends are imported lazily by name, so opening an ONNX file never imports torch.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UsageError
from .base import Runner

CHECKPOINT_SUFFIXES = (".pth", ".ckpt", ".bin", ".safetensors", ".tar")
FORMAT_SUFFIXES = {
    ".onnx": "onnx",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
}
# backend name -> (module, class); modules are imported only when used.
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("toolkit.runtime.torch_runner", "TorchRunner"),
    "torchscript": ("toolkit.runtime.torchscript_runner", "TorchScriptRunner"),
    "onnxruntime": ("toolkit.runtime.onnxruntime_runner", "OnnxRuntimeRunner"),
    "openvino": ("toolkit.runtime.openvino_runner", "OpenVINORunner"),
    "tensorrt": ("toolkit.runtime.tensorrt_runner", "TensorRTRunner"),
    "remote": ("toolkit.runtime.remote_runner", "RemoteRunner"),
}
# which backends can run which artifact format; the first is the default for "auto".
FORMAT_BACKENDS = {
    "checkpoint": ("torch",),
    "torchscript": ("torchscript",),
    "onnx": ("onnxruntime", "openvino"),
    "tensorrt": ("tensorrt",),
    "remote": ("remote",),
}


def _is_torchscript_zip(path: Path) -> bool:
    """TorchScript archives hold `code/` and `constants.pkl`; plain checkpoints do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def triton_model_file(directory: Path) -> Path:
    """The newest version's model file inside a Triton model directory (or a one-model repository)."""
    if not (directory / "config.pbtxt").is_file():
        models = [d for d in directory.iterdir() if d.is_dir() and (d / "config.pbtxt").is_file()]
        if len(models) != 1:
            raise ModelFormatError(f"{directory}: not a Triton model directory (no config.pbtxt)")
        directory = models[0]
    versions = sorted((d for d in directory.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    for version in reversed(versions):
        for name in ("model.onnx", "model.plan"):
            if (version / name).is_file():
                return version / name
    raise ModelFormatError(f"{directory}: no <version>/model.onnx or model.plan inside")


def detect_format(model: str | Path) -> str:
    """checkpoint | torchscript | onnx | tensorrt | remote, from the name (and zip contents for .pt)."""
    text = str(model)
    if text.startswith(("http://", "https://")):
        return "remote"
    path = Path(model)
    if path.is_dir():
        return detect_format(triton_model_file(path))
    if not path.exists():
        raise ModelFormatError(f"model not found: {path}")
    suffix = path.suffix.lower()
    if suffix in FORMAT_SUFFIXES:
        return FORMAT_SUFFIXES[suffix]
    if suffix == ".pt":
        return "torchscript" if _is_torchscript_zip(path) else "checkpoint"
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    raise ModelFormatError(
        f"{path}: unknown model type {suffix or '(no suffix)'}; expected a checkpoint (.pt .pth .ckpt "
        ".safetensors), TorchScript (.ts), ONNX (.onnx), a TensorRT engine (.engine .plan), a Triton "
        "model directory or an http:// v2 URL"
    )


def backend_class(name: str) -> type[Runner]:
    module_name, class_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def open_model(model: str | Path, backend: str = "auto", device: str = "cpu", **options: Any) -> Runner:
    """Open any artifact as a Runner. `options` go to the backend (e.g. `allow_pickle`, `arch`)."""
    fmt = detect_format(model)
    allowed = FORMAT_BACKENDS[fmt]
    if backend == "auto":
        backend = allowed[0]
    elif backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    elif backend not in allowed:
        raise UsageError(f"backend {backend} cannot run a {fmt} file; use one of: {', '.join(allowed)}")
    path: str | Path = model if fmt == "remote" else Path(model)
    if isinstance(path, Path) and path.is_dir():
        path = triton_model_file(path)
    cls = backend_class(backend)
    opener = getattr(cls, "from_checkpoint", None) if fmt == "checkpoint" else getattr(cls, "open")
    return opener(path, device=device, **options)
