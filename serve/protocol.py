"""The server's side of the Open Inference Protocol: metadata, config, and infer request handling.

The wire format itself lives in `toolkit.v2` (shared with `RemoteRunner`); this module maps one
served Runner onto it as Triton would describe the same model exported with
`toolkit export --format triton`: input "input" FP32 [-1, 3, H, W], output "logits" FP32 [-1, C].
The card travels in the config's `parameters["toolkit.card"]`, so a client rebuilds preprocessing.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from toolkit import __version__
from toolkit.card import ModelCard
from toolkit.errors import InputError
from toolkit.v2 import (
    CARD_PARAMETER,
    INPUT_NAME,
    OUTPUT_NAME,
    InferRequest,
    ProtocolError,
    Tensor,
    classify,
    decode_request,
    encode_response,
)

from .config import ServeConfig
from .errors import PayloadTooLargeError, UnsupportedMediaError

EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "model_repository", "statistics"]


def server_metadata() -> dict[str, Any]:
    return {"name": "toolkit", "version": __version__, "extensions": EXTENSIONS}


def _platform(backend: str) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torchscript": "pytorch_libtorch",
            "torch": "pytorch", "openvino": "openvino"}.get(backend, backend)


def model_metadata(config: ServeConfig, card: ModelCard, backend: str) -> dict[str, Any]:
    return {
        "name": config.name,
        "versions": [config.version],
        "platform": _platform(backend),
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *card.input_size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, card.num_classes]}],
    }


def model_config(config: ServeConfig, card: ModelCard, backend: str) -> dict[str, Any]:
    """Triton's ModelConfig as JSON (what `tritonclient.get_model_config` returns from Triton)."""
    return {
        "name": config.name,
        "platform": _platform(backend),
        "backend": backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                   "dims": list(card.input_size)}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [card.num_classes],
                    "label_filename": "labels.txt"}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(config.max_delay_ms * 1000),
                             "default_queue_policy": {"max_queue_size": config.max_queue,
                                                      "default_timeout_microseconds":
                                                          int(config.timeout_s * 1e6)}},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {CARD_PARAMETER: {"string_value": card.to_json()}},
    }


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


def parse_infer(body: bytes, header_length: str | None, encoding: str | None, card: ModelCard,
                limit: int) -> tuple[InferRequest, np.ndarray]:
    """A raw infer body -> (the parsed request, the model's float32 NCHW batch). No HTTP in here."""
    request = decode_request(decompress(body, encoding, limit), header_length)
    return request, input_batch(request, card)


def input_batch(request: InferRequest, card: ModelCard) -> np.ndarray:
    """The one FP32 input as a float32 NCHW batch; anything else names what is expected."""
    expected = f"FP32 [N, {', '.join(map(str, card.input_size))}]"
    if len(request.inputs) != 1:
        raise ProtocolError(f"expected exactly one input {INPUT_NAME!r} {expected}, "
                            f"got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.name!r}; expected {INPUT_NAME!r} {expected}")
    if tensor.datatype != "FP32":
        raise ProtocolError(f"input {INPUT_NAME!r} has datatype {tensor.datatype}; expected {expected}")
    shape = tuple(tensor.data.shape)
    data = tensor.data[None] if len(shape) == 3 else tensor.data  # a single image without the batch dim
    if data.ndim != 4 or tuple(data.shape[1:]) != tuple(card.input_size) or len(data) < 1:
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {list(shape)}; expected {expected} with N >= 1")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise InputError(f"input {INPUT_NAME!r} holds NaN or infinite values")
    return data


def infer_response(request: InferRequest, logits: np.ndarray, config: ServeConfig,
                   card: ModelCard) -> tuple[bytes, int | None]:
    """Encode the requested outputs (raw logits or classification strings)."""
    wanted = request.outputs or []
    for out in wanted:
        if out.name != OUTPUT_NAME:
            raise ProtocolError(f"unknown output {out.name!r}; this model has {OUTPUT_NAME!r}")
    default_binary = request.binary_output_default
    outputs: list[tuple[Tensor, bool]] = []
    if not wanted:
        outputs.append((Tensor(OUTPUT_NAME, logits), default_binary))
    for out in wanted:
        binary = default_binary if out.binary is None else out.binary
        if out.classification:
            strings = classify(logits, out.classification, card.class_names)
            outputs.append((Tensor(OUTPUT_NAME, strings), binary))
        else:
            outputs.append((Tensor(OUTPUT_NAME, logits), binary))
    return encode_response(config.name, config.version, outputs, request.id)
