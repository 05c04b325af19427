"""A stand-in for the tensorrt module and cuda-python, following their documented signatures.

TensorRT 10/11 name-based I/O (`num_io_tensors`, `get_tensor_name/mode/dtype/shape`,
`get_tensor_profile_shape`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`), the builder
(`create_network`, `OnnxParser.parse_from_file`, `create_builder_config`, `set_memory_pool_limit`,
`create_optimization_profile`, timing caches, `build_serialized_network`), `trt.DataType`/`trt.nptype`,
and cudart's `(err, value)` tuples. "Device" memory is host memory and an "engine" runs the ONNX on
ONNX Runtime, so the export -> sidecars -> runner -> Triton path, buffer reuse, profile padding and
chunking are exercised on machines without a GPU. It cannot prove the real API matches; the GPU tests
in tests/test_tensorrt.py do that.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


class FakeCudart:
    class cudaMemcpyKind:  # cudart's spelling
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.buffers: dict[int, object] = {}

    def _alloc(self, nbytes):
        import ctypes

        buffer = (ctypes.c_ubyte * nbytes)()
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetErrorString(self, err):
        return 0, b"simulated CUDA error"

    def cudaGetDeviceProperties(self, index):
        from types import SimpleNamespace

        return 0, SimpleNamespace(name=b"Simulated GPU\0\0", major=9, minor=0)

    def cudaSetDevice(self, index):
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, ptr):
        self.buffers.pop(ptr)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        import ctypes

        assert stream == 7 and (dst in self.buffers or src in self.buffers)
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    cudaStreamDestroy = cudaStreamSynchronize


def fake_tensorrt(version: str = "10.9.0"):
    """The subset of the tensorrt module that export.tensorrt and TensorRTRunner use."""
    import ctypes
    from types import SimpleNamespace

    import onnx
    import onnxruntime as ort

    trt = SimpleNamespace(__version__=version, built=[])
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = SimpleNamespace(TF32="tf32")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    trt.DataType = SimpleNamespace(FLOAT="DataType.FLOAT", HALF="DataType.HALF", INT8="DataType.INT8")
    nptypes = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT8: np.int8}
    trt.nptype = nptypes.__getitem__

    def tensor(value):
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        return SimpleNamespace(name=value.name, shape=dims, dtype=trt.DataType.FLOAT)

    class Network:
        def __init__(self, flags):
            trt.built.append({"network_flags": flags})
            self.num_inputs = self.num_outputs = 0

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            model = onnx.load(path)
            self.network.onnx = model.SerializeToString()
            self.network.inputs = [tensor(model.graph.input[0])]
            self.network.outputs = [tensor(model.graph.output[0])]
            self.network.num_inputs = self.network.num_outputs = 1
            return True

    class Cache:
        def __init__(self, data):
            self.data = data or b"timings"

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.settings = {"flags_cleared": []}

        def set_memory_pool_limit(self, pool, size):
            self.settings[pool] = size

        def clear_flag(self, flag):
            self.settings["flags_cleared"].append(flag)

        def add_optimization_profile(self, profile):
            self.settings["profile"] = profile.shapes
            return 0

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)

        def create_optimization_profile(self):
            profile = SimpleNamespace(shapes={})
            profile.set_shape = lambda name, low, opt, high: profile.shapes.update({name: (low, opt, high)})
            return profile

        def build_serialized_network(self, network, config):
            trt.built[-1].update(config.settings)
            name = network.inputs[0].name
            header = json.dumps({"profile": config.settings["profile"][name], "input": name,
                                 "output": network.outputs[0].name}).encode()
            return header + b"\n" + network.onnx  # a simulated plan; real ones are opaque bytes

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shape = engine, {}, None

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile
            self.shape = shape
            return low[0] <= shape[0] <= high[0]

        def get_tensor_shape(self, name):
            return (self.shape[0], self.engine.classes)

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            count = int(np.prod(self.shape))
            raw = (ctypes.c_float * count).from_address(self.addresses[self.engine.input])
            batch = np.frombuffer(raw, np.float32).reshape(self.shape).copy()
            logits = self.engine.session.run(None, {self.engine.input: batch})[0].astype(np.float32)
            ctypes.memmove(self.addresses[self.engine.output], logits.ctypes.data, logits.nbytes)
            self.engine.calls.append(len(batch))
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, data):
            header, model = data.split(b"\n", 1)
            meta = json.loads(header)
            self.profile, self.input, self.output = meta["profile"], meta["input"], meta["output"]
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.classes = self.session.get_outputs()[0].shape[-1]
            self.calls = []
            trt.engines.append(self)

        def get_tensor_name(self, i):
            return (self.input, self.output)[i]

        def get_tensor_mode(self, name):
            return "input" if name == self.input else "output"

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            return (-1, *self.profile[0][1:]) if name == self.input else (-1, self.classes)

        def get_tensor_profile_shape(self, name, index):
            return self.profile

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(bytes(data))
            except Exception:  # noqa: BLE001 - TensorRT returns None for bytes it cannot read
                return None

    trt.Builder, trt.OnnxParser, trt.Runtime, trt.engines = Builder, OnnxParser, Runtime, []
    return trt


def install(monkeypatch: Any, version: str = "10.9.0") -> tuple[Any, FakeCudart]:
    """`import tensorrt` and the runner's cuda-python lookup find the stand-ins (until the test ends)."""
    from toolkit.runtime import tensorrt_runner

    trt, cudart = fake_tensorrt(version), FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_runner, "import_cudart", lambda: cudart)
    return trt, cudart
