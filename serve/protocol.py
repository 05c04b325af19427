"""The server's side of the Open Inference Protocol, free of any transport: HTTP (`routes.v2`) and
gRPC (`serve.grpc`) call the same functions, so both answer every request as Triton would.

The wire codec lives in `toolkit.v2` (shared with `RemoteRunner`); this module maps one served
Runner onto it as Triton describes the same model exported with `toolkit export --format triton`:
input "input" FP32 [-1, 3, H, W], output "logits" FP32 [-1, C], the config built by
`toolkit.triton_config` (the same builder writes config.pbtxt) with the model's own serving settings.
Requests are checked as Triton checks them, with Triton's messages (batch size, shape), and values
are not inspected (NaN/Inf are the model's business) unless `reject_nonfinite` is set. Also here:
the logging and trace settings objects and the shared-memory extension (regions in `serve.shm`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit import __version__, triton_config
from toolkit.card import ModelCard
from toolkit.errors import InputError
from toolkit.v2 import (
    INPUT_NAME,
    OUTPUT_NAME,
    InferRequest,
    ProtocolError,
    Tensor,
    classify,
    decode_request,
    encode_response,
    serialize_bytes_tensor,
    v2_to_np,
)

from .config import ServeConfig
from .errors import PayloadTooLargeError, UnsupportedMediaError
from .shm import SharedMemoryError, SharedMemoryRegistry

if TYPE_CHECKING:
    from .models import ServedModel

EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "model_repository", "statistics",
              "system_shared_memory", "cuda_shared_memory", "trace", "logging"]
SHM_REGION, SHM_SIZE, SHM_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"
log = logging.getLogger("toolkit.serve")


class SettingsError(InputError):
    """A logging or trace setting Triton would refuse (400)."""


def server_metadata() -> dict[str, Any]:
    return {"name": "toolkit", "version": __version__, "extensions": EXTENSIONS}


def _platform(backend: str) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torchscript": "pytorch_libtorch",
            "torch": "pytorch", "openvino": "openvino"}.get(backend, backend)


def _batch_dim(model: ServedModel) -> list[int]:
    """The batch dimension of the model's tensors as Triton shows it: -1, none when it does not batch."""
    return [-1] if model.settings.max_batch_size else []


def model_metadata(model: ServedModel, versions: list[str] | None = None) -> dict[str, Any]:
    card, batch = model.card, _batch_dim(model)
    return {
        "name": model.name,
        "versions": versions or [model.version],
        "platform": _platform(model.description.backend),
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [*batch, *card.input_size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [*batch, card.num_classes]}],
    }


def model_config(model: ServedModel) -> dict[str, Any]:
    """Triton's ModelConfig as JSON: the exported config.pbtxt's builder with this model's serving
    settings, plus the fields Triton fills in when it loads a config (backend, version policy)."""
    card, settings, backend = model.card, model.settings, model.description.backend
    kind = settings.kind if settings.kind != "KIND_AUTO" else (
        "KIND_GPU" if model.description.device.startswith("cuda") else "KIND_CPU")
    return triton_config.build(
        name=model.name, platform=_platform(backend), backend=backend,
        version_policy=dict(settings.version_policy), max_batch_size=settings.max_batch_size,
        inputs=[triton_config.tensor(INPUT_NAME, "TYPE_FP32", card.input_size)],
        outputs=[triton_config.tensor(OUTPUT_NAME, "TYPE_FP32", [card.num_classes],
                                      triton_config.LABELS_FILE)],
        card=card, instance_count=settings.instances or 1, kind=kind, dynamic_batching=settings.batching,
        max_queue_delay_us=int(settings.max_delay_ms * 1000),
        queue_policy={"max_queue_size": settings.max_queue,
                      "default_timeout_microseconds": int(settings.timeout_s * 1e6)})


def memory_usage(source: str) -> list[dict[str, Any]]:
    """The weights' bytes held in host memory (what Triton's `memory_usage` reports), if known."""
    path = Path(source)
    if "://" in source or not path.exists():
        return []
    from toolkit.fileio import artifact_size

    return [{"type": "CPU", "id": 0, "byte_size": artifact_size(path)}]


# --- logging and trace settings (Triton's objects; logging levels act on the server's log) -----------

_LOG_BOOLS = ("log_info", "log_warning", "log_error")
_TRACE_LEVELS = frozenset({"OFF", "TIMESTAMPS", "TENSORS"})
_TRACE_NUMBERS = ("trace_rate", "trace_count", "log_frequency")
TRACE_DEFAULTS: dict[str, Any] = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                                  "log_frequency": "0", "trace_file": "", "trace_mode": "triton"}


@dataclass
class ProtocolState:
    """What the protocol's extensions keep between requests: settings and shared-memory regions."""

    log: dict[str, Any] = field(default_factory=lambda: {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
        "log_format": "default"})
    trace: dict[str, Any] = field(default_factory=lambda: dict(TRACE_DEFAULTS))
    model_trace: dict[str, dict[str, Any]] = field(default_factory=dict)
    shm: SharedMemoryRegistry = field(default_factory=SharedMemoryRegistry)

    def update_log(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise SettingsError("logging settings must be a JSON object")
        new = dict(self.log)
        for key, value in body.items():
            if key in _LOG_BOOLS:
                if not isinstance(value, bool):
                    raise SettingsError(f"expect boolean for '{key}'")
            elif key == "log_verbose_level":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise SettingsError("expect non-negative integer for 'log_verbose_level'")
            elif key == "log_format":
                if value not in ("default", "ISO8601"):
                    raise SettingsError(f"invalid log format {value!r}; expect 'default' or 'ISO8601'")
            elif key == "log_file":
                if value not in ("", self.log["log_file"]):
                    raise SettingsError("changing the log file is not supported: the server logs to stderr")
            else:
                raise SettingsError(f"unknown logging setting '{key}'")
            new[key] = value
        self.log = new
        level = (logging.DEBUG if new["log_verbose_level"] else logging.INFO if new["log_info"]
                 else logging.WARNING if new["log_warning"] else logging.ERROR if new["log_error"]
                 else logging.CRITICAL + 1)
        log.setLevel(level)
        return dict(new)

    def trace_settings(self, model: str | None = None) -> dict[str, Any]:
        return dict(self.trace) if model is None else {**self.trace, **self.model_trace.get(model, {})}

    def update_trace(self, body: Any, model: str | None = None) -> dict[str, Any]:
        """Set (or with null: reset) trace settings, globally or for one model, as Triton's API does.
        The server records no traces; the settings are kept so clients and tools see them honoured."""
        if not isinstance(body, Mapping):
            raise SettingsError("trace settings must be a JSON object")
        target = dict(self.trace if model is None else self.model_trace.get(model, {}))
        for key, value in body.items():
            if key not in TRACE_DEFAULTS:
                raise SettingsError(f"unknown trace setting '{key}'")
            if value is None:  # clear: back to the global value (or the default for the global settings)
                target.pop(key, None)
                if model is None:
                    target[key] = TRACE_DEFAULTS[key]
                continue
            if key == "trace_level":
                levels = value if isinstance(value, list) else [value]
                if not levels or not all(isinstance(v, str) and v in _TRACE_LEVELS for v in levels):
                    raise SettingsError(f"trace_level must be a list of {', '.join(sorted(_TRACE_LEVELS))}")
                value = list(levels)
            elif key in _TRACE_NUMBERS:
                if not isinstance(value, str) or not value.lstrip("-").isdigit():
                    raise SettingsError(f"expect a string holding an integer for '{key}', got {value!r}")
            elif not isinstance(value, str):
                raise SettingsError(f"expect a string for '{key}'")
            target[key] = value
        if model is None:
            self.trace = target
        else:
            self.model_trace[model] = target
        return self.trace_settings(model)

    # --- shared memory ------------------------------------------------------------------------------

    def read_input(self, params: Mapping[str, Any], datatype: str, shape: list[int], name: str) -> np.ndarray:
        if datatype == "BYTES":
            raise ProtocolError(f"input {name!r}: BYTES inputs cannot come from shared memory here")
        dtype = v2_to_np(datatype).newbyteorder("<")
        return self.shm.read(params.get(SHM_REGION), params.get(SHM_OFFSET), params.get(SHM_SIZE), dtype,
                             shape, f"input {name!r}")


def cuda_shared_memory_unsupported() -> None:
    raise InputError("CUDA shared memory is not supported by this server (it keeps tensors in host "
                     "memory); register system shared memory instead (perf_analyzer --shared-memory system)")


# --- inference ---------------------------------------------------------------------------------------

def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Content-Encoding gzip/deflate request bodies (tritonclient can send them), capped at `limit`."""
    if not encoding or encoding.lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise UnsupportedMediaError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"request body is not valid {encoding} ({exc})") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise PayloadTooLargeError(f"decompressed body is over the limit of {limit} bytes")
    return out


def region_request(body: Any) -> tuple[str, Any, Any]:
    """(key, offset, byte_size) of a system shared-memory register request's JSON body."""
    if not isinstance(body, Mapping) or not isinstance(body.get("key"), str):
        raise SharedMemoryError("register needs a JSON object with 'key', 'offset' and 'byte_size'")
    return body["key"], body.get("offset", 0), body.get("byte_size")


def parse_infer(body: bytes, header_length: str | None, encoding: str | None, model: ServedModel,
                config: ServeConfig, extensions: ProtocolState) -> tuple[InferRequest, np.ndarray]:
    """A raw HTTP infer body -> (the parsed request, the model's float32 NCHW batch)."""
    request = decode_request(decompress(body, encoding, config.max_body_bytes), header_length,
                             extensions.read_input)
    return request, input_batch(request, model, config)


def _dims(dims: Any) -> str:
    return "[" + ",".join(str(int(d)) for d in dims) + "]"  # Triton's DimsListToString


def input_batch(request: InferRequest, model: ServedModel, config: ServeConfig) -> np.ndarray:
    """The one FP32 input as a float32 NCHW batch, checked in Triton's order with Triton's messages."""
    card, name, limit = model.card, model.name, model.settings.max_batch_size
    prefix = f"[request id: {request.id}] " if request.id else ""
    expected = f"FP32 [N, {', '.join(map(str, card.input_size))}]"
    if len(request.inputs) != 1:
        raise ProtocolError(f"{prefix}expected exactly one input {INPUT_NAME!r} {expected}, "
                            f"got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise ProtocolError(f"{prefix}unknown input {tensor.name!r}; expected {INPUT_NAME!r} {expected}")
    if tensor.datatype != "FP32":
        raise ProtocolError(f"{prefix}inference input '{INPUT_NAME}' data-type is '{tensor.datatype}', but "
                            f"model '{name}' expects 'FP32'")
    shape = [int(d) for d in tensor.data.shape]
    full = [-1, *card.input_size]
    if not shape:
        raise ProtocolError(f"{prefix}input '{INPUT_NAME}' has no shape but model requires batch dimension "
                            f"for '{name}'")
    if limit and shape[0] > limit:  # max_batch_size 0: the model does not batch; the runner checks N
        raise ProtocolError(f"{prefix}inference request batch-size must be <= {limit} for '{name}'")
    if shape[1:] != list(card.input_size):
        raise ProtocolError(
            f"{prefix}unexpected shape for input '{INPUT_NAME}' for model '{name}'. Expected "
            f"{_dims(full)}, got {_dims(shape)}. NOTE: Setting a non-zero max_batch_size in the model config "
            "requires a batch dimension to be prepended to each input shape. If you want to specify the full "
            "shape including the batch dim in your input dims config, try setting max_batch_size to zero. "
            "See the model configuration docs for more info on max_batch_size.")
    if shape[0] < 1:
        raise ProtocolError(f"{prefix}input '{INPUT_NAME}' has shape {_dims(shape)}; expected {expected} "
                            "with N >= 1")
    data = np.ascontiguousarray(tensor.data, dtype=np.float32)
    if config.reject_nonfinite and not np.isfinite(data).all():
        raise InputError(f"{prefix}input '{INPUT_NAME}' holds NaN or infinite values (--reject-nonfinite)")
    return data


def response_tensors(request: InferRequest, logits: np.ndarray, card: ModelCard,
                     extensions: ProtocolState) -> list[tuple[Tensor, bool]]:
    """The requested outputs (raw logits or classification strings) and whether each goes binary;
    outputs that name a shared memory region are written there and carry no data."""
    wanted = request.outputs or []
    for out in wanted:
        if out.name != OUTPUT_NAME:
            raise ProtocolError(f"unknown output {out.name!r}; this model has {OUTPUT_NAME!r}")
    default_binary = request.binary_output_default
    if not wanted:
        return [(Tensor(OUTPUT_NAME, logits), default_binary)]
    outputs: list[tuple[Tensor, bool]] = []
    for out in wanted:
        binary = default_binary if out.binary is None else out.binary
        data = classify(logits, out.classification, card.class_names) if out.classification else logits
        tensor = Tensor(OUTPUT_NAME, data)
        if SHM_REGION in out.parameters:
            raw = (serialize_bytes_tensor(data) if data.dtype == object
                   else np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes())
            region, size = out.parameters.get(SHM_REGION), out.parameters.get(SHM_SIZE)
            extensions.shm.write(region, out.parameters.get(SHM_OFFSET), size, raw, f"output {out.name!r}")
            tensor.parameters = {SHM_REGION: region, SHM_SIZE: len(raw)}
        outputs.append((tensor, binary))
    return outputs


def infer_response(request: InferRequest, logits: np.ndarray, model: ServedModel,
                   extensions: ProtocolState) -> tuple[bytes, int | None]:
    """The HTTP body (and binary header length, None for pure JSON) of an inference response."""
    tensors = response_tensors(request, logits, model.card, extensions)
    return encode_response(model.name, model.version, tensors, request.id)
