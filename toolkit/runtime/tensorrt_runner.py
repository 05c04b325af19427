"""TensorRT engines as a Runner (TensorRT 10 and 11 name-based API).

An engine is tied to the GPU (compute capability) and the exact TensorRT version that built it,
so its card lives in a sidecar `<engine>.card.json` and its facts (toolkit/artifacts.py) in
`<engine>.facts.json`, which record both; a mismatch gives a "rebuild" message instead of TensorRT's
opaque deserialization error. Nothing is ever glued in front of the engine bytes, so
`trtexec --loadEngine` and Triton read it as is.

Device memory and streams come from cuda-python (`cuda.bindings.runtime`, as NVIDIA's own
TensorRT samples do), never from torch: this module, like the ONNX and OpenVINO runners, must not
pay torch's import cost. tensorrt and cuda-python are imported lazily, inside functions.
I/O follows the TensorRT 10 API: `set_input_shape`, `set_tensor_address`, `execute_async_v3`.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts, check_declared_input, read_engine
from ..card import ModelCard
from ..errors import BackendUnavailableError, InputError, ModelFormatError, UsageError
from .base import Runner

INSTALL_HINT = "pip install 'resnet-toolkit[tensorrt]' on a machine with an NVIDIA GPU and driver"
REBUILD_HINT = "rebuild the engine on this GPU/TensorRT: toolkit export -m CHECKPOINT --format tensorrt"
MIN_TENSORRT_MAJOR = 10


@dataclass(frozen=True)
class TensorRTEnvironment:
    """What this process can build or run engines with: the modules and the GPU facts."""

    trt: Any
    cudart: Any
    version: str
    device_index: int
    gpu_name: str
    compute_capability: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def facts(self) -> dict[str, Any]:
        """The facts an engine depends on (ArtifactFacts fields): written in its facts, checked on load."""
        return {"tensorrt_version": self.version, "gpu": self.gpu_name,
                "compute_capability": self.compute_capability}


def import_cudart() -> Any | None:
    """cuda-python's runtime API: `cuda.bindings.runtime` (>= 12.6), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            return None
    return cudart


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python `(err, *values)` tuple; raise with CUDA's own words on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, text = cudart.cudaGetErrorString(err)
        raise BackendUnavailableError(f"CUDA {what} failed: {text.decode(errors='replace')}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def device_index(device: str) -> int:
    """`cuda` / `cuda:N`; `cpu` and `auto` mean the default GPU, since an engine runs nowhere else."""
    if device in ("cpu", "auto", "cuda", "gpu"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise UsageError(f"--device {device!r}: a TensorRT engine runs on a CUDA GPU; use cuda or cuda:N")


def tensorrt_environment(device: str = "cuda", purpose: str = "TensorRT") -> TensorRTEnvironment:
    """Import tensorrt and cuda-python and find the GPU, or say in one line what is missing."""
    missing: list[str] = []
    trt: Any = None
    try:
        import tensorrt

        trt = tensorrt
    except Exception as exc:  # noqa: BLE001 - stub wheels and missing libnvinfer raise more than ImportError
        loaded = "" if isinstance(exc, ImportError) else f" (it failed to load: {exc})"
        missing.append("the tensorrt package" + loaded)
    cudart = import_cudart()
    if cudart is None:
        missing.append("cuda-python")
    index = device_index(device)
    gpu_name = capability = ""
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            reason = "no CUDA device"
            if int(err):
                reason = cudart.cudaGetErrorString(err)[1].decode(errors="replace")
            missing.append(f"an NVIDIA GPU (none is visible here: {reason})")
        elif index >= count:
            missing.append(f"GPU cuda:{index} (this machine has {count})")
        else:
            props = cuda_call(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
            gpu_name = bytes(props.name).split(b"\0", 1)[0].decode(errors="replace").strip()
            capability = f"{props.major}.{props.minor}"
    if missing:
        raise BackendUnavailableError(f"{purpose} needs {' and '.join(missing)}: {INSTALL_HINT}")
    version = str(trt.__version__)
    if int(version.split(".")[0]) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError(
            f"{purpose} needs TensorRT >= {MIN_TENSORRT_MAJOR} (found {version}): "
            "pip install -U 'resnet-toolkit[tensorrt]'"
        )
    assert cudart is not None  # else `missing` said so above
    cuda_call(cudart, cudart.cudaSetDevice(index), "cudaSetDevice")
    return TensorRTEnvironment(trt, cudart, version, index, gpu_name, capability)


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One logger per process, as TensorRT recommends; warnings and errors only."""
    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


def check_compatible(facts: ArtifactFacts, env: TensorRTEnvironment, path: Path) -> None:
    """Engines load only on the TensorRT version and compute capability that built them."""
    version, capability = facts.tensorrt_version, facts.compute_capability
    if (version and version != env.version) or (capability and capability != env.compute_capability):
        raise ModelFormatError(
            f"{path.name} was built with TensorRT {version or '?'} for compute capability "
            f"{capability or '?'} ({facts.gpu or 'unknown GPU'}); this machine has TensorRT "
            f"{env.version} on {env.gpu_name} "
            f"(compute capability {env.compute_capability}): {REBUILD_HINT}"
        )


class _Pinned:
    """Page-locked host buffer (async copies need it) viewed as a flat numpy array."""

    def __init__(self, cudart: Any, nbytes: int, dtype: np.dtype) -> None:
        self._cudart = cudart
        self.ptr = int(cuda_call(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_ubyte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(memoryview(raw), dtype=np.uint8).view(dtype)

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0)
            self._cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


class TensorRTRunner(Runner):
    """A deserialized engine, one execution context, buffers sized once for the profile's max batch."""

    backend = "tensorrt"

    def __init__(self, path: Path, card: ModelCard, env: TensorRTEnvironment,
                 facts: ArtifactFacts | None = None) -> None:
        trt, cudart = env.trt, env.cudart
        self._env, self._cudart = env, cudart
        self._lock = threading.Lock()
        self._closed = False
        self._device_ptrs: list[int] = []
        self._pinned: list[_Pinned] = []
        self._stream: Any = None
        runtime = trt.Runtime(trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelFormatError(f"{path}: TensorRT {env.version} could not deserialize it (corrupt, or "
                                   f"built for another GPU/TensorRT version): {REBUILD_HINT}")
        self._runtime, self._engine = runtime, engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelFormatError(f"{path}: expected one input and one output, found inputs {inputs}, "
                                   f"outputs {outputs}")
        self._in, self._out = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._out)))
        shape = tuple(engine.get_tensor_shape(self._in))
        check_declared_input(card, shape, path, f"the engine's input {self._in}")
        fixed = shape[0] if shape[0] > 0 else None
        if fixed is None:
            low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(self._in, 0))
            self._min_batch, max_batch = int(low[0]), int(high[0])
        else:
            self._min_batch = max_batch = fixed
        super().__init__(card, source=str(path), device=f"cuda:{env.device_index}", fixed_batch_size=fixed,
                         max_batch_size=max_batch, facts=facts)
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailableError(f"{path}: TensorRT could not create an execution context "
                                          "(out of GPU memory?)")
        try:
            self._allocate(max_batch)
        except BaseException:
            self.close()
            raise
        self._shape: tuple[int, ...] | None = None

    def _allocate(self, max_batch: int) -> None:
        """Device and pinned host buffers for the largest batch; tensor addresses are set once."""
        cudart = self._cudart
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._per_in = int(np.prod(self.card.input_size))
        self._per_out = self.card.num_classes
        sizes = {self._in: max_batch * self._per_in * self._in_dtype.itemsize,
                 self._out: max_batch * self._per_out * self._out_dtype.itemsize}
        ptrs = {}
        for name, nbytes in sizes.items():
            ptrs[name] = int(cuda_call(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._device_ptrs.append(ptrs[name])
            if not self._context.set_tensor_address(name, ptrs[name]):
                raise ModelFormatError(f"TensorRT refused the address of tensor {name}")
        self._d_in, self._d_out = ptrs[self._in], ptrs[self._out]
        self._h_in = _Pinned(cudart, sizes[self._in], self._in_dtype)
        self._h_out = _Pinned(cudart, sizes[self._out], self._out_dtype)
        self._pinned += [self._h_in, self._h_out]

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cuda", warmup: int = 1) -> TensorRTRunner:
        """Open `model.engine` / `model.plan` with its sidecar card and facts; `warmup`: calls run at
        load (`Runner.warm_up`)."""
        path = Path(path)
        card, facts = read_engine(path)
        env = tensorrt_environment(device, purpose="running a TensorRT engine")
        check_compatible(facts, env, path)
        return cls(path, card, env, facts).warm_up(warmup)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        rows = max(n, self._min_batch)  # a profile whose min exceeds the batch gets zero padding
        cudart, stream = self._cudart, self._stream
        with self._lock:
            if self._closed:
                raise InputError("this TensorRT runner is closed")
            host_in = self._h_in.array[: rows * self._per_in].reshape(rows, *self.card.input_size)
            host_in[:n] = batch
            host_in[n:] = 0
            shape = (rows, *self.card.input_size)
            if shape != self._shape:
                if not self._context.set_input_shape(self._in, shape):
                    raise InputError(f"the engine's optimisation profile does not accept input shape {shape}")
                self._shape = shape
            out_shape = tuple(self._context.get_tensor_shape(self._out))
            if out_shape != (rows, self._per_out):
                raise ModelFormatError(f"engine output {self._out} is {out_shape}, "
                                       f"expected ({rows}, {self._per_out})")
            kinds = cudart.cudaMemcpyKind
            h2d, d2h = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost
            cuda_call(cudart, cudart.cudaMemcpyAsync(self._d_in, self._h_in.ptr, host_in.nbytes, h2d, stream),
                      "copy to GPU")
            if not self._context.execute_async_v3(int(stream)):
                raise ModelFormatError("TensorRT failed to run the engine; see the TensorRT messages above")
            out_bytes = rows * self._per_out * self._out_dtype.itemsize
            cuda_call(cudart, cudart.cudaMemcpyAsync(self._h_out.ptr, self._d_out, out_bytes, d2h, stream),
                      "copy from GPU")
            cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            logits = self._h_out.array[: rows * self._per_out].reshape(rows, self._per_out)[:n]
            return logits.astype(np.float32, copy=True)  # the pinned buffer is reused by the next call

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cudart = self._cudart
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for ptr in self._device_ptrs:
                cudart.cudaFree(ptr)
            self._device_ptrs.clear()
            for buffer in self._pinned:
                buffer.free()
            self._pinned.clear()
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._context = None  # context before engine before runtime, as TensorRT requires
            self._engine = None
            self._runtime = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down cuda-python
            self.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt_version": self._env.version, "gpu": self._env.gpu_name,
                "compute_capability": self._env.compute_capability, "min_batch_size": self._min_batch}
