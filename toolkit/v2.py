"""The Open Inference Protocol (KServe v2) wire codec, shared by the server and `RemoteRunner`.

Covers what Triton's HTTP endpoint speaks: JSON tensors, the binary-data extension (a JSON header
followed by raw little-endian bytes, its length in `Inference-Header-Content-Length`, each tensor's
byte count in `parameters.binary_data_size`) and the classification extension (BYTES strings
"<value>:<index>[:<label>]"). Pure numpy and json: no web framework, no torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .names import INPUT_NAME, OUTPUT_NAME  # noqa: F401 - the wire's tensor names, for the server's codec

HEADER_LENGTH = "Inference-Header-Content-Length"
# The Triton config parameter that carries the card.
CARD_PARAMETER = "toolkit.card"

# v2 datatype <-> numpy. BF16 has no numpy dtype and is refused with a message.
_V2_TO_NP: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_NP_TO_V2 = {np.dtype(v).str if k != "BYTES" else "|O": k for k, v in _V2_TO_NP.items()}


class ProtocolError(InputError):
    """A v2 request or response that does not follow the protocol (HTTP 400)."""


def v2_to_np(datatype: str) -> np.dtype:
    """numpy dtype of a v2 datatype name; unknown names raise ProtocolError listing the known ones."""
    try:
        return np.dtype(_V2_TO_NP[datatype])
    except KeyError:
        raise ProtocolError(f"unsupported datatype {_short(datatype)}; expected one of "
                            f"{', '.join(_V2_TO_NP)}") from None


def np_to_v2(dtype: Any) -> str:
    """v2 datatype name of a numpy dtype (str/bytes arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _NP_TO_V2[dtype.newbyteorder("<").str if dtype.byteorder == ">" else dtype.str]
    except KeyError:
        raise ProtocolError(f"numpy dtype {dtype} has no v2 datatype") from None


# --- BYTES tensors: each element is a 4-byte little-endian length then the bytes ---------------

def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    parts = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview) -> np.ndarray:
    items, offset, view = [], 0, memoryview(buffer)
    while offset < len(view):
        if offset + 4 > len(view):
            raise ProtocolError("BYTES tensor data is truncated (incomplete length prefix)")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError("BYTES tensor data is truncated (element longer than the buffer)")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    return np.array(items, dtype=object)


# --- tensors -------------------------------------------------------------------------------------

@dataclass
class Tensor:
    """One named tensor of a request or response; `parameters` as sent on the wire."""

    name: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def datatype(self) -> str:
        return np_to_v2(self.data.dtype)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request-level default
    classification: int = 0  # 0: raw tensor; k > 0: top-k "value:index:label" strings
    parameters: dict[str, Any] = field(default_factory=dict)  # as sent (e.g. shared_memory_region)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output_default(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


MAX_DIMS = 32  # dimensions of one tensor (numpy allows 64)
MAX_DIM = 2**40  # one dimension; any real tensor is far smaller, and the product stays an exact int


def _element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)  # exact Python int: no int64 overflow for hostile shapes


def parse_shape(value: Any, name: str) -> list[int]:
    """A tensor's shape from a client (JSON list, or a protobuf's dims as a list), bounded."""
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, got "
                            f"{_short(value)}")
    if len(value) > MAX_DIMS or any(d > MAX_DIM for d in value):
        raise ProtocolError(f"input {name!r}: shape {_short(value)} is out of range (at most {MAX_DIMS} "
                            f"dimensions of at most {MAX_DIM})")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """A bounded description of a client's value for an error message (never a deep repr)."""
    if isinstance(value, list):
        text = "[" + ", ".join(repr(v) if isinstance(v, (int, float, str)) else type(v).__name__
                               for v in value[:8]) + (", ...]" if len(value) > 8 else "]")
    else:
        plain = isinstance(value, (int, float, str, bool)) or value is None
        text = repr(value) if plain else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _flat_values(data: Any, levels: int, name: str) -> list[Any]:
    """JSON tensor data, flat or nested, as one flat list; nesting deeper than `levels` is refused."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(v, list) for v in data):
        return data
    if levels <= 1:
        raise ProtocolError(f"input {name!r}: 'data' is nested deeper than its shape")
    flat: list[Any] = []
    for item in data:
        flat.extend(_flat_values(item, levels - 1, name) if isinstance(item, list) else [item])
    return flat


def _json_tensor(raw: Mapping[str, Any], datatype: str, shape: list[int], name: str) -> np.ndarray:
    data = raw.get("data")
    if data is None:
        raise ProtocolError(f"input {name!r}: no 'data' and no 'binary_data_size' parameter")
    flat = _flat_values(data, max(1, len(shape)), name)
    if len(flat) != _element_count(shape):
        raise ProtocolError(f"input {name!r}: shape {shape} needs {_element_count(shape)} values, "
                            f"got {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: 'data' must hold only strings for BYTES")
        return np.array([v.encode("utf-8") for v in flat], dtype=object).reshape(shape)
    if not all(isinstance(v, (int, float)) for v in flat):  # bool is an int; None, str, dict are not
        raise ProtocolError(f"input {name!r}: 'data' must hold only numbers for {datatype}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range floats -> inf: the caller decides
            return np.asarray(flat, dtype=v2_to_np(datatype)).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: data is not valid {datatype} ({exc})") from None


def binary_tensor(chunk: memoryview, datatype: str, shape: list[int], name: str,
                  source: str = "binary_data_size") -> np.ndarray:
    """Raw little-endian bytes (HTTP's binary extension, gRPC's raw_input_contents) as a tensor of `shape`;
    `source` names where the bytes came from in the error."""
    if datatype == "BYTES":
        array = deserialize_bytes_tensor(chunk)
        if len(array) != _element_count(shape):
            raise ProtocolError(f"input {name!r}: shape {shape} needs {_element_count(shape)} strings, "
                                f"got {len(array)}")
        return array.reshape(shape)
    dtype = v2_to_np(datatype).newbyteorder("<")
    expected = _element_count(shape) * dtype.itemsize
    if len(chunk) != expected:
        raise ProtocolError(f"input {name!r}: {datatype} shape {shape} needs {expected} bytes, "
                            f"binary_data_size says {len(chunk)}")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def split_body(body: bytes, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    """JSON header and the binary tail of a v2 request or response body."""
    view = memoryview(body)
    if header_length is None or header_length == "":
        size = len(body)
    else:
        try:
            size = int(header_length)
        except (TypeError, ValueError):
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {size} is outside the body of {len(body)} bytes")
    try:
        header = json.loads(bytes(view[:size]))
    except RecursionError:
        raise ProtocolError("request header is nested too deeply to be a v2 request") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints of over 4300 digits
        raise ProtocolError(f"request header is not valid JSON ({exc}); binary tensors need the "
                            f"{HEADER_LENGTH} header") from None
    if not isinstance(header, dict):
        raise ProtocolError("request header must be a JSON object")
    return header, view[size:]


def _parameters(raw: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{what}: 'parameters' must be an object")
    return params


# (parameters, datatype, shape, input name) -> the tensor held in a registered shared memory region
SharedMemoryReader = Callable[[Mapping[str, Any], str, list[int], str], np.ndarray]


def decode_request(body: bytes, header_length: str | int | None = None,
                   shared_memory: SharedMemoryReader | None = None) -> InferRequest:
    """Parse an inference request (JSON or binary extension); every violation names what was expected.

    Inputs naming a `shared_memory_region` are read through `shared_memory` (the server's registry)."""
    header, tail = split_body(body, header_length)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    inputs, offset = [], 0
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError("each input needs a 'name', 'shape', 'datatype' and data")
        name = raw["name"]
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"input {name!r}: missing 'datatype'")
        v2_to_np(datatype)
        shape = parse_shape(raw.get("shape"), name)
        params = _parameters(raw, f"input {name!r}")
        size = params.get("binary_data_size")
        if "shared_memory_region" in params:
            if shared_memory is None:
                raise ProtocolError(f"input {name!r}: shared memory inputs are not read here")
            data = shared_memory(params, datatype, shape, name)
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
                raise ProtocolError(f"input {name!r}: binary_data_size {_short(size)} does not fit the "
                                    f"{len(tail)} bytes after the JSON header")
            data = binary_tensor(tail[offset:offset + size], datatype, shape, name)
            offset += size
        else:
            data = _json_tensor(raw, datatype, shape, name)
        inputs.append(Tensor(name, data, params))
    if offset != len(tail):
        raise ProtocolError(f"{len(tail) - offset} bytes after the JSON header belong to no input "
                            f"(check binary_data_size and {HEADER_LENGTH})")
    raw_outputs = header.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise ProtocolError(f"'outputs' must be a list of requested outputs, got {_short(raw_outputs)}")
    outputs = []
    for raw in raw_outputs or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError("each requested output needs a 'name'")
        params = _parameters(raw, f"output {raw['name']!r}")
        count = params.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProtocolError(f"output {raw['name']!r}: 'classification' must be a non-negative integer")
        binary = params.get("binary_data")
        outputs.append(RequestedOutput(raw["name"], None if binary is None else bool(binary), count, params))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, (str, int)):
        raise ProtocolError(f"'id' must be a string, got {_short(request_id)}")
    return InferRequest(inputs, outputs, None if request_id is None else str(request_id),
                        _parameters(header, "request"))


def _encode_tensors(tensors: Sequence[tuple[Tensor, bool]]) -> tuple[list[dict[str, Any]], list[bytes]]:
    described, blobs = [], []
    for tensor, binary in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": [int(d) for d in tensor.data.shape]}
        params = dict(tensor.parameters)
        if "shared_memory_region" in params:  # written into the client's region: no data, and (as Triton)
            described.append(entry)  # no parameters, which clients would read binary_data_size from
            continue
        if binary:
            if tensor.datatype == "BYTES":
                raw = serialize_bytes_tensor(tensor.data)
            else:
                raw = np.ascontiguousarray(tensor.data, dtype=tensor.data.dtype.newbyteorder("<")).tobytes()
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                             for v in tensor.data.reshape(-1)]
        else:
            entry["data"] = tensor.data.reshape(-1).tolist()
        if params:
            entry["parameters"] = params
        described.append(entry)
    return described, blobs


def _join(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def encode_response(model_name: str, model_version: str, outputs: Sequence[tuple[Tensor, bool]],
                    request_id: str | None = None) -> tuple[bytes, int | None]:
    """Body and header length (None for pure JSON) of an inference response."""
    described, blobs = _encode_tensors(outputs)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        header["id"] = request_id
    return _join(header, blobs)


def encode_request(inputs: Sequence[Tensor], outputs: Sequence[RequestedOutput] = (), *, binary: bool = True,
                   request_id: str | None = None) -> tuple[bytes, int | None]:
    """Body and header length of an inference request, as tritonclient builds it."""
    described, blobs = _encode_tensors([(t, binary) for t in inputs])
    header: dict[str, Any] = {"inputs": described}
    if request_id is not None:
        header["id"] = request_id
    if outputs:
        header["outputs"] = []
        for out in outputs:
            params: dict[str, Any] = {"binary_data": binary if out.binary is None else out.binary}
            if out.classification:
                params["classification"] = out.classification
            header["outputs"].append({"name": out.name, "parameters": params})
    else:
        header["parameters"] = {"binary_data_output": binary}
    return _join(header, blobs)


def decode_response(body: bytes, header_length: str | int | None = None) -> dict[str, np.ndarray]:
    """Output name -> array from an inference response (JSON or binary)."""
    header, tail = split_body(body, header_length)
    if "error" in header:
        raise ProtocolError(str(header["error"]))
    result, offset = {}, 0
    for raw in header.get("outputs") or []:
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise ProtocolError("response output lacks 'name', 'datatype' or 'shape'")
        shape = parse_shape(shape, name)
        size = _parameters(raw, f"output {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
                raise ProtocolError(f"output {name!r}: binary_data_size {_short(size)} does not fit "
                                    "the response")
            result[name] = binary_tensor(tail[offset:offset + size], datatype, shape, name)
            offset += size
        else:
            result[name] = _json_tensor(raw, datatype, shape, name)
    return result


# --- classification extension --------------------------------------------------------------------

def classify(scores: np.ndarray, count: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """Triton's classification output: BYTES [batch, count] of "<value>:<index>[:<label>]", best first.

    Values are formatted like C++ `std::to_string(float)` (six decimals), as Triton does.
    """
    scores = np.asarray(scores)
    if scores.ndim == 1:
        scores = scores[None]
    scores = scores.reshape(len(scores), -1)
    count = min(count, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :count]
    rows = []
    for row, indices in zip(scores, order):
        items = []
        for index in indices:
            text = f"{float(row[index]):f}:{int(index)}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            items.append(text.encode("utf-8"))
        rows.append(items)
    return np.array(rows, dtype=object).reshape(len(scores), count)


def parse_classification(value: bytes | str) -> tuple[float, int, str | None]:
    """"0.9:3:cat" -> (0.9, 3, "cat"); labels may contain ':' themselves."""
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ProtocolError(f"not a classification result: {text!r}")
    try:
        return float(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else None
    except ValueError:
        raise ProtocolError(f"not a classification result: {text!r}") from None
