"""The Open Inference Protocol over gRPC: Triton's `GRPCInferenceService`, in the server's own process.

tritonclient.grpc, KServe's InferenceGRPCClient and `perf_analyzer -i grpc` speak this service. It
runs on grpcio's asyncio server inside uvicorn's event loop and only decodes and encodes: the work is
`ServerState`'s, as for the HTTP routes (`infer`, `authorised` with metadata `authorization: Bearer
<key>` or `x-api-key`, the index, model control, statistics, shared-memory regions, in-flight counting
for the drain), and every document comes from `serve.protocol`, so both transports say the same thing.

The generated service modules are the ones inside `tritonclient[grpc]` (installed, not vendored):
`pip install 'resnet-toolkit[grpc]'`. Outputs always travel in `raw_output_contents`, as Triton's
gRPC endpoint sends them; inputs may come raw, as typed `contents`, or from system shared memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.v2 import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    Tensor,
    binary_tensor,
    parse_shape,
    serialize_bytes_tensor,
    v2_to_np,
)

from . import protocol
from .models import ServedModel
from .state import ServerState

INSTALL_HINT = "gRPC needs grpcio and tritonclient[grpc]: pip install 'resnet-toolkit[grpc]'"
try:
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
except ImportError as exc:  # the one line `toolkit serve` shows (or warns with when gRPC was not asked for)
    raise ImportError(f"{INSTALL_HINT} ({exc.name} is missing)", name=exc.name) from None

log = logging.getLogger("toolkit.serve")
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # as /v2/health/* over HTTP: no API key needed
POOL_ABOVE = 16384  # typed `contents` with more values than this are converted off the event loop
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
           503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
           507: grpc.StatusCode.RESOURCE_EXHAUSTED}
# v2 datatype -> the typed field of InferTensorContents that carries it (FP16/BF16 travel raw only)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


# --- conversions between the protobuf messages and serve.protocol's objects -----------------------------

def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf map<string, InferParameter> as plain values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def _input(tensor: Any, raw: bytes | None, extensions: protocol.ProtocolState) -> Tensor:
    name, datatype = tensor.name, tensor.datatype
    dtype = v2_to_np(datatype)
    shape = parse_shape([int(d) for d in tensor.shape], name)
    params = _parameters(tensor.parameters)
    count = math.prod(shape)
    if protocol.SHM_REGION in params:
        data = extensions.read_input(params, datatype, shape, name)
    elif raw is not None:  # the same check of raw bytes as HTTP's binary extension
        data = binary_tensor(memoryview(raw), datatype, shape, name, source="raw_input_contents")
    else:
        field = _CONTENTS.get(datatype)
        if field is None:
            raise ProtocolError(f"input {name!r}: {datatype} travels only in raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise ProtocolError(f"input {name!r}: shape {shape} needs {count} values, contents.{field} "
                                f"holds {len(values)}")
        data = np.array(list(values), dtype=object) if datatype == "BYTES" else np.asarray(values, dtype)
    return Tensor(name, data.reshape(shape), params)


def infer_request(message: Any, extensions: protocol.ProtocolState) -> InferRequest:
    """A ModelInferRequest as the transport-independent InferRequest."""
    raws = list(message.raw_input_contents)
    if raws and len(raws) != len(message.inputs):
        raise ProtocolError(f"raw_input_contents holds {len(raws)} tensors for {len(message.inputs)} inputs "
                            "(when raw contents are used, every input needs one)")
    inputs = [_input(tensor, raws[i] if raws else None, extensions)
              for i, tensor in enumerate(message.inputs)]
    outputs = []
    for out in message.outputs:
        params = _parameters(out.parameters)
        count = params.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProtocolError(f"output {out.name!r}: 'classification' must be a non-negative integer")
        outputs.append(RequestedOutput(out.name, True, count, params))
    return InferRequest(inputs, outputs, message.id or None, _parameters(message.parameters))


def infer_response(request: InferRequest, tensors: list[tuple[Tensor, bool]], model: ServedModel) -> Any:
    response = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version,
                                              id=request.id or "")
    for tensor, _ in tensors:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.data.shape))
        if protocol.SHM_REGION in tensor.parameters:
            response.raw_output_contents.append(b"")  # written into the region; keeps indices aligned
        elif tensor.datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes_tensor(tensor.data))
        else:
            data = np.ascontiguousarray(tensor.data, tensor.data.dtype.newbyteorder("<"))
            response.raw_output_contents.append(data.tobytes())
    return response


def _message(document: Any, message: Any) -> Any:
    return json_format.ParseDict(document, message, ignore_unknown_fields=True)


def _settings(values: dict[str, Any], response: Any) -> Any:
    for key, value in values.items():
        entry = response.settings[key]
        if isinstance(value, list):
            entry.value.extend(str(v) for v in value)
        elif hasattr(entry, "bool_param"):  # LogSettings: typed values
            if isinstance(value, bool):
                entry.bool_param = value
            elif isinstance(value, int):
                entry.uint32_param = value
            else:
                entry.string_param = str(value)
        else:
            entry.value.append(str(value))
    return response


def _log_value(value: Any) -> Any:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


# --- the service ------------------------------------------------------------------------------------------

Handler = Callable[[Any, Any, Any], Awaitable[Any]]


def _rpc(method: Handler) -> Handler:
    """API key, then the method; a ToolkitError becomes the gRPC status its HTTP status maps to."""
    name = method.__name__

    async def call(self: InferenceService, request: Any, context: Any) -> Any:
        if name in OPEN_METHODS:
            return await method(self, request, context)
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        if not self.state.authorised(metadata.get("x-api-key"), metadata.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send metadata "
                                "'authorization: Bearer <key>' or 'x-api-key: <key>'")
        try:
            with self.state.busy():  # the drain waits for calls in flight, as for HTTP POSTs
                return await method(self, request, context)
        except ToolkitError as exc:
            await context.abort(_STATUS.get(exc.http_status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        except Exception as exc:  # the server's own bug: logged, answered INTERNAL
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.error("internal error in gRPC %s", name, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); "
                                "see the server log")

    call.__name__ = name
    return call


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's GRPCInferenceService over one ServerState."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.state.serving)

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        state, version = self.state, request.version or None
        ready = state.models.is_ready(request.name, version) and not state.draining and not state.unavailable
        if not ready and not state.models.knows(request.name, version):
            state.model(request.name, version)  # NOT_FOUND for a model the server does not know
        return service_pb2.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return _message(protocol.server_metadata(), service_pb2.ServerMetadataResponse())

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = self.state.model(request.name, request.version)
        document = protocol.model_metadata(model, self.state.models.versions(request.name))
        return _message(document, service_pb2.ModelMetadataResponse())

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        document = protocol.model_config(self.state.model(request.name, request.version))
        return service_pb2.ModelConfigResponse(config=_message(document, model_config_pb2.ModelConfig()))

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        document = await self.state.statistics(request.name or None, request.version or None)
        return _message(document, service_pb2.ModelStatisticsResponse())

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        rows = self.state.models.index(bool(request.ready))
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await self.state.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.state.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    @_rpc
    async def LogSettings(self, request: Any, context: Any) -> Any:
        extensions = self.state.extensions
        if request.settings:
            extensions.update_log({k: _log_value(v) for k, v in request.settings.items()})
        return _settings(extensions.log, service_pb2.LogSettingsResponse())

    @_rpc
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        extensions, model = self.state.extensions, request.model_name or None
        if model is not None:
            self.state.model(model)
        if request.settings:
            update: dict[str, Any] = {}
            for key, value in request.settings.items():
                values = list(value.value)
                update[key] = None if not values else (values if key == "trace_level" else values[0])
            extensions.update_trace(update, model)
        return _settings(extensions.trace_settings(model), service_pb2.TraceSettingResponse())

    @_rpc
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for region in self.state.extensions.shm.status(request.name or None):
            response.regions[region["name"]].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    @_rpc
    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self.state.register_region(request.name, request.key, int(request.offset),
                                         int(request.byte_size))
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_rpc
    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self.state.unregister_region(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    @_rpc
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            raise ProtocolError(f"Unable to find cuda shared memory region: '{request.name}'")
        return service_pb2.CudaSharedMemoryStatusResponse()

    @_rpc
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        protocol.cuda_shared_memory_unsupported()

    @_rpc
    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return service_pb2.CudaSharedMemoryUnregisterResponse()

    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        state = self.state
        extensions = state.extensions

        async def decode(model: ServedModel) -> tuple[InferRequest, np.ndarray]:
            typed = not request.raw_input_contents and sum(math.prod(t.shape) for t in request.inputs)
            if typed and typed > POOL_ABOVE:
                parsed = await state.in_pool(infer_request, request, extensions)
            else:
                parsed = infer_request(request, extensions)
            return parsed, protocol.input_batch(parsed, model, state.config)

        def encode(model: ServedModel, parsed: InferRequest, logits: np.ndarray | None) -> Any:
            assert logits is not None
            return infer_response(parsed, protocol.response_tensors(parsed, logits, model.card, extensions),
                                  model)

        return await state.infer(state.model(request.model_name, request.model_version), decode, encode)


async def start(state: ServerState) -> grpc.aio.Server:
    """Listen on `config.host:config.grpc_port` in the running event loop; raises OSError if it cannot."""
    config = state.config
    limit = config.max_body_bytes
    # SO_REUSEPORT only to join the port the parent process holds for the workers (serve.ports); alone,
    # never: a second server would share the port silently
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
                                      ("grpc.so_reuseport", int(config.reserved_ports))])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        port = server.add_insecure_port(f"{host}:{config.grpc_port}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {config.host}:{config.grpc_port} ({exc})") from None
    if not port:
        raise OSError(f"cannot listen for gRPC on {config.host}:{config.grpc_port} (port in use?)")
    await server.start()
    log.info("gRPC (v2) on %s:%d", config.host, port)
    return server
