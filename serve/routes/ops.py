"""Operations: the page, liveness/readiness probes, Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from ..state import ServerState, get_state

STATIC = Path(__file__).resolve().parents[1] / "static"
State = Annotated[ServerState, Depends(get_state)]
router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text("utf-8"))


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(status_code=204)


@router.get("/v2/health/live")
async def live() -> Response:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready")
async def ready(state: State) -> Response:
    if state.serving:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": f"not ready: {state.readiness_reason()}"}, status_code=503)


@router.get("/metrics")
async def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(await state.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
