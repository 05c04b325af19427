"""The Open Inference Protocol (KServe v2) as Triton's HTTP endpoint speaks it.

Route bodies only move bytes: parsing, validation and encoding are `serve.protocol` functions
(free of HTTP, so the gRPC front end can call the same ones).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from toolkit.v2 import HEADER_LENGTH

from .. import protocol
from ..metrics import RequestTiming
from ..state import ServerState, get_state

State = Annotated[ServerState, Depends(get_state)]
router = APIRouter()
POOL_ABOVE = 65536  # JSON bodies larger than this (big JSON tensors) are parsed off the event loop


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return protocol.server_metadata()


@router.get("/v2/models/stats")
async def all_stats(state: State) -> dict[str, Any]:
    return state.stats.v2_statistics(state.config.name, state.config.version)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    state.check_model(name, version)
    return protocol.model_metadata(state.config, state.runner.card, state.runner.backend)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(state: State, name: str, version: str | None = None) -> Response:
    state.check_model(name, version)
    return JSONResponse({"name": name, "ready": state.serving}, status_code=200 if state.serving else 503)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    state.check_model(name, version)
    return protocol.model_config(state.config, state.runner.card, state.runner.backend)


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    state.check_model(name, version)
    return state.stats.v2_statistics(state.config.name, state.config.version)


@router.post("/v2/repository/index")
async def repository_index(state: State) -> list[dict[str, str]]:
    status = "READY" if state.serving else ("UNAVAILABLE" if state.draining else "LOADING")
    return [{"name": state.config.name, "version": state.config.version, "state": status, "reason": ""}]


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: Request, state: State, name: str, version: str | None = None) -> Response:
    state.check_model(name, version)
    batcher = state.require_ready()
    config, card = state.config, state.runner.card

    async def work(timing: RequestTiming) -> Response:
        began = time.perf_counter()
        body = await request.body()
        args = (body, request.headers.get(HEADER_LENGTH), request.headers.get("content-encoding"), card,
                config.max_body_bytes)
        if len(body) > POOL_ABOVE and args[1] is None:
            parsed, batch = await state.in_pool(protocol.parse_infer, *args)
        else:
            parsed, batch = protocol.parse_infer(*args)
        timing.input_s = time.perf_counter() - began
        logits = await batcher.infer(batch, timing)
        began = time.perf_counter()
        payload, length = protocol.infer_response(parsed, logits, config, card)
        timing.output_s = time.perf_counter() - began
        if length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    return await state.counted(work)
