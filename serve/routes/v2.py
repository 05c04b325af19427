"""The Open Inference Protocol (KServe v2) as Triton's HTTP endpoint speaks it, extensions included:
statistics, repository, logging, trace settings, system/CUDA shared memory.

Route bodies only move bytes: parsing, validation and encoding are `serve.protocol` functions and
the work is `ServerState`'s (free of HTTP, so the gRPC front end calls the same ones). Fixed paths
are declared before the `{name}` patterns that would swallow them (`/v2/models/stats`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from toolkit.v2 import HEADER_LENGTH, InferRequest, ProtocolError

from .. import protocol
from ..models import ServedModel
from ..state import ServerState, get_state

State = Annotated[ServerState, Depends(get_state)]
router = APIRouter()
INLINE_JSON_BYTES = 65536  # JSON bodies up to this size are parsed on the event loop


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError("request body is not valid JSON") from None


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return protocol.server_metadata()


@router.get("/v2/models/stats")
async def all_stats(state: State) -> dict[str, Any]:
    return await state.statistics()


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return protocol.model_metadata(state.model(name, version), state.models.versions(name))


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(state: State, name: str, version: str | None = None) -> Response:
    ready = state.models.is_ready(name, version) and not state.draining and not state.unavailable
    if not ready and not state.models.knows(name, version):
        state.model(name, version)  # 404 for a model the server does not know
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return protocol.model_config(state.model(name, version))


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return await state.statistics(name, version)


# --- repository --------------------------------------------------------------------------------------

@router.post("/v2/repository/index")
async def repository_index(request: Request, state: State) -> list[dict[str, str]]:
    body = await _json_body(request)
    ready_only = isinstance(body, dict) and body.get("ready") is True
    return state.models.index(ready_only)


@router.post("/v2/repository/models/{name}/load")
async def load(state: State, name: str) -> Response:
    await state.load(name)
    return Response(status_code=200)  # as Triton: success is an empty 200


@router.post("/v2/repository/models/{name}/unload")
async def unload(state: State, name: str) -> Response:
    await state.unload(name)
    return Response(status_code=200)


# --- logging and trace settings ----------------------------------------------------------------------

@router.get("/v2/logging")
async def get_logging(state: State) -> dict[str, Any]:
    return dict(state.extensions.log)


@router.post("/v2/logging")
async def set_logging(request: Request, state: State) -> dict[str, Any]:
    return state.extensions.update_log(await _json_body(request))


@router.get("/v2/trace/setting")
async def get_trace(state: State) -> dict[str, Any]:
    return state.extensions.trace_settings()


@router.post("/v2/trace/setting")
async def set_trace(request: Request, state: State) -> dict[str, Any]:
    return state.extensions.update_trace(await _json_body(request))


@router.get("/v2/models/{name}/trace/setting")
async def get_model_trace(state: State, name: str) -> dict[str, Any]:
    state.model(name)
    return state.extensions.trace_settings(name)


@router.post("/v2/models/{name}/trace/setting")
async def set_model_trace(request: Request, state: State, name: str) -> dict[str, Any]:
    state.model(name)
    return state.extensions.update_trace(await _json_body(request), name)


# --- shared memory -----------------------------------------------------------------------------------

@router.get("/v2/systemsharedmemory/status")
async def shm_status(state: State) -> list[dict[str, Any]]:
    return state.extensions.shm.status()


@router.get("/v2/systemsharedmemory/region/{region}/status")
async def shm_region_status(state: State, region: str) -> list[dict[str, Any]]:
    return state.extensions.shm.status(region)


@router.post("/v2/systemsharedmemory/region/{region}/register")
async def shm_register(request: Request, state: State, region: str) -> dict[str, Any]:
    await state.register_region(region, *protocol.region_request(await _json_body(request)))
    return {}


@router.post("/v2/systemsharedmemory/region/{region}/unregister")
async def shm_unregister(state: State, region: str) -> dict[str, Any]:
    await state.unregister_region(region)
    return {}


@router.post("/v2/systemsharedmemory/unregister")
async def shm_unregister_all(state: State) -> dict[str, Any]:
    await state.unregister_region(None)
    return {}


@router.get("/v2/cudasharedmemory/status")
async def cuda_status() -> list[dict[str, Any]]:
    return []


@router.get("/v2/cudasharedmemory/region/{region}/status")
async def cuda_region_status(region: str) -> list[dict[str, Any]]:
    raise ProtocolError(f"Unable to find cuda shared memory region: '{region}'")


@router.post("/v2/cudasharedmemory/region/{region}/register")
async def cuda_register(region: str) -> None:
    protocol.cuda_shared_memory_unsupported()


@router.post("/v2/cudasharedmemory/region/{region}/unregister")
@router.post("/v2/cudasharedmemory/unregister")
async def cuda_unregister(region: str | None = None) -> dict[str, Any]:
    return {}  # nothing can be registered, so there is nothing to unregister


# --- inference ---------------------------------------------------------------------------------------

@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: Request, state: State, name: str, version: str | None = None) -> Response:
    headers = request.headers
    return await answer_infer(state, name, version, request.body, headers.get(HEADER_LENGTH),
                              headers.get("content-encoding"))


async def answer_infer(state: ServerState, name: str, version: str | None,
                       read_body: Callable[[], Awaitable[bytes]], header_length: str | None,
                       content_encoding: str | None) -> Response:
    """One v2 inference request answered: served by the route above and by `serve.hotpath`, which
    calls it without FastAPI's per-request machinery."""
    config, extensions = state.config, state.extensions

    async def decode(model: ServedModel) -> tuple[InferRequest, np.ndarray]:
        body = await read_body()
        args = (body, header_length, content_encoding, model, config, extensions)
        if header_length is None:  # JSON tensors: big ones are parsed off the event loop
            return await state.offload(len(body), protocol.parse_infer, *args, inline_below=INLINE_JSON_BYTES)
        return protocol.parse_infer(*args)  # binary tensors are views of the body: no work worth a thread

    def encode(model: ServedModel, parsed: InferRequest, logits: np.ndarray | None) -> Response:
        assert logits is not None
        payload, length = protocol.infer_response(parsed, logits, model, extensions)
        if length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    return await state.infer(state.model(name, version), decode, encode)
