"""ONNX Runtime: CPU by default; CUDA (and TensorRT, when its libraries are present) for --device cuda.

Sessions use full graph optimisation and one intra-op thread per physical core. Input and output
names are looked up once, so a call is one `session.run`. Never imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts, check_declared_input, read_artifact
from ..card import ModelCard
from ..errors import BackendUnavailableError, ModelFormatError, first_line
from .base import Runner
from .cpu import physical_cores


def _tensorrt_present() -> bool:
    return importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None


def providers_for(device: str, available: list[str], use_tensorrt: bool | None = None) -> list[Any]:
    """Execution providers for a device, or BackendUnavailableError naming what is missing."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailableError(
            "--device cuda needs onnxruntime-gpu with the CUDA execution provider "
            f"(available here: {', '.join(available)}); pip install onnxruntime-gpu, or use --device cpu"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    chosen: list[Any] = []
    if use_tensorrt is None:
        use_tensorrt = _tensorrt_present()
    if use_tensorrt and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {"device_id": index}))
    chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    return chosen


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no provider-fallback chatter on stderr
    return options


class OnnxRuntimeRunner(Runner):
    """One `onnxruntime.InferenceSession` over an ONNX file with a toolkit card."""

    backend = "onnxruntime"

    def __init__(self, session: Any, card: ModelCard, *, source: str, device: str,
                 facts: ArtifactFacts | None = None) -> None:
        first = session.get_inputs()[0]
        batch_dim = first.shape[0] if first.shape else None
        fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        super().__init__(card, source=source, device=device, fixed_batch_size=fixed, facts=facts)
        self.session = session
        self._input = first.name
        self._outputs = [session.get_outputs()[0].name]

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", threads: int | None = None,
             use_tensorrt: bool | None = None) -> OnnxRuntimeRunner:
        """`threads`: intra-op threads (default: physical cores); `use_tensorrt`: ORT's TensorRT provider
        on cuda (default: when its libraries are present)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from None
        path = Path(path)
        card, facts = read_artifact(path, "onnx")
        check_declared_input(card, facts.inputs[0].shape if facts.inputs else (), path, "the ONNX graph")
        providers = providers_for(device, ort.get_available_providers(), use_tensorrt)
        if device.startswith("cuda") and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from the nvidia-* wheels torch brought, when installed; best effort, since
            # the provider check below reports what is missing
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                           providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises InvalidProtobuf, Fail, InvalidGraph, NotImplemented...
            raise ModelFormatError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})") from None
        if device.startswith("cuda") and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(
                "ONNX Runtime could not start its CUDA provider (CUDA 12 runtime and cuDNN 9 libraries "
                "are needed, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'); or use --device cpu"
            )
        return cls(session, card, source=str(path), device=device, facts=facts)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(self._outputs, {self._input: batch})[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.session.get_providers() if self.session else []}

    def close(self) -> None:
        self.session = None
