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

from ..artifacts import ArtifactFacts, check_declared_input, read_onnx
from ..card import ModelCard
from ..errors import BackendUnavailableError, ModelFormatError, UsageError, first_line
from .base import Runner
from .cpu import physical_cores


def _tensorrt_present() -> bool:
    return importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None


def default_trt_cache() -> Path:
    """Where ORT's TensorRT provider keeps built engines between runs ($XDG_CACHE_HOME or ~/.cache)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet-toolkit" / "ort-trt"


def tensorrt_provider_options(index: int, precision: str = "fp32",
                              cache: str | Path | None = None) -> dict[str, Any]:
    """ORT TensorRT provider options: engines cached in a folder (built once per shape and GPU), fp16 /
    int8 kernels allowed when the ONNX itself is fp16 / Q/DQ int8 (TensorRT 10 reads the Q/DQ nodes)."""
    return {"device_id": index, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache or default_trt_cache()), "trt_timing_cache_enable": True,
            "trt_fp16_enable": precision in ("fp16", "int8"), "trt_int8_enable": precision == "int8"}


def providers_for(device: str, available: list[str], use_tensorrt: bool | None = None, *,
                  precision: str = "fp32", trt_cache: str | Path | None = None) -> list[Any]:
    """Execution providers for a device, or BackendUnavailableError naming what is missing.

    `use_tensorrt=True` (`--trt`) insists on ORT's TensorRT provider; None uses it when present."""
    if not device.startswith("cuda"):
        if use_tensorrt:
            raise UsageError("--trt needs --device cuda (ONNX Runtime's TensorRT provider)")
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailableError(
            "--device cuda needs onnxruntime-gpu with the CUDA execution provider "
            f"(available here: {', '.join(available)}); pip install onnxruntime-gpu, or use --device cpu"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    chosen: list[Any] = []
    if use_tensorrt and "TensorrtExecutionProvider" not in available:
        raise BackendUnavailableError(
            "--trt needs onnxruntime-gpu built with the TensorRT execution provider and TensorRT's "
            f"libraries (available here: {', '.join(available)}); drop --trt to use CUDA alone")
    if use_tensorrt is None:
        use_tensorrt = _tensorrt_present()
    if use_tensorrt and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", tensorrt_provider_options(index, precision, trt_cache)))
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
        self._pinned: dict[tuple[int, ...], Any] = {}

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", threads: int | None = None,
             use_tensorrt: bool | None = None, trt_cache: str | Path | None = None,
             warmup: int = 1) -> OnnxRuntimeRunner:
        """`threads`: intra-op threads (default: physical cores); `use_tensorrt`: ORT's TensorRT provider
        on cuda (default: when its libraries are present; True insists); `trt_cache`: its engine cache
        folder (default ~/.cache/resnet-toolkit/ort-trt); `warmup`: calls run at load (`Runner.warm_up`)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from None
        path = Path(path)
        card, facts = read_onnx(path)
        check_declared_input(card, facts.inputs[0].shape if facts.inputs else (), path, "the ONNX graph")
        providers = providers_for(device, ort.get_available_providers(), use_tensorrt,
                                  precision=facts.precision or "fp32", trt_cache=trt_cache)
        if trt_cache is not None:
            Path(trt_cache).mkdir(parents=True, exist_ok=True)
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
        return cls(session, card, source=str(path), device=device, facts=facts).warm_up(warmup)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.device.startswith("cuda"):
            return self._infer_bound(batch)
        return self.session.run(self._outputs, {self._input: batch})[0]

    def _infer_bound(self, batch: np.ndarray) -> np.ndarray:
        """CUDA: I/O binding, the batch staged in a pinned host buffer per shape (copied to the GPU by
        DMA inside the run), logits allocated on the GPU and copied back once."""
        import onnxruntime as ort

        index = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
        staged = self._pinned.get(batch.shape)
        if staged is None:
            staged = ort.OrtValue.ortvalue_from_shape_and_type(batch.shape, np.float32, "cuda_pinned", index)
            self._pinned = {batch.shape: staged}  # one shape at a time: the loop's batch size
        staged.update_inplace(batch)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self._input, staged)
        binding.bind_output(self._outputs[0], "cuda", index)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.session.get_providers() if self.session else []}

    def close(self) -> None:
        self.session = None
