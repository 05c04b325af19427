"""The FastAPI app: routers (`serve.routes`), the shared state, error handlers, and the models' start.

`create_app(models, config)` builds the app around a model source (serve.repository: a repository, `-m`
files, or one opened Runner). Readiness is honest: the models load and warm up in the background and
`/v2/health/ready` says 503 until every model that should be loaded is, and again once draining
began; a model that fails at start stops the server (`toolkit serve` exits 1 with the reason) instead
of leaving it up and never ready. Every client mistake is a 4xx with `{"error": ...}`; the guard
middlewares (`serve.guards`) run before any route.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.errors import ToolkitError

from .config import ServeConfig
from .control import LocalFleet, ModelControl
from .errors import error_answer, error_response, internal_error_answer
from .ipc import name_process
from .repository import as_source
from .routes import ROUTERS
from .state import ServerState

log = logging.getLogger("toolkit.serve")


def create_app(models: Any, config: ServeConfig, link: Any = None) -> FastAPI:
    """The server around `models`: a ModelSource, an opened Runner (the caller keeps ownership and closes
    it) or an opener served as `config.name`.

    In a front-end worker process (`serve.workers`), `link` (a `serve.remote.HubLink`) connects it to the
    inference process, which decides the models, their readiness and the merged statistics; `models`
    is then None.
    """
    state = ServerState(config=config, link=link)
    if link is None:
        state.control = ModelControl(as_source(models, config), LocalFleet(
            state.models, warmup=config.warmup, drain_timeout_s=config.drain_timeout_s),
            mode=config.model_control, startup=config.load_models, on_change=lambda: _ready(state))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        state.loop = asyncio.get_running_loop()
        state.pool = ThreadPoolExecutor(max_workers=max(1, config.decode_workers),  # named for `top -H`
                                        thread_name_prefix="toolkit-decode", initializer=name_process,
                                        initargs=("toolkit-decode",))
        if link is not None:
            await link.start(state)
        grpc_server = await _start_grpc(state) if config.grpc_port else None
        start = asyncio.create_task(_start_models(state)) if state.control is not None else None
        try:
            yield
        finally:
            if start is not None:
                start.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=min(5.0, config.drain_timeout_s))
            state.extensions.shm.close()
            if state.control is not None:
                await state.control.stop()
            if link is not None:
                await link.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="toolkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.toolkit = state
    for router in ROUTERS:
        app.include_router(router)
    _add_error_handlers(app, config)
    return app


def _ready(state: ServerState) -> None:
    state.ready, state.not_ready = state.control.readiness()


async def _start_models(state: ServerState) -> None:
    """Load the start-up models; one that cannot load stops the server (`state.on_fatal`), so
    `toolkit serve` exits 1 with the reason instead of staying up and never ready."""
    try:
        await state.control.start()
        log.info("ready: %s", state.models.describe_served())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the reason the server stops, not a traceback
        state.fatal = str(exc) or type(exc).__name__
        log.error("cannot serve: %s", state.fatal)
        if state.on_fatal is not None:
            state.on_fatal()


def _add_error_handlers(app: FastAPI, config: ServeConfig) -> None:
    """Always `{"error": ...}`; a 4xx for the client's mistake, a 500 only for the server's own bug."""

    @app.exception_handler(ToolkitError)
    async def toolkit_error(_: Request, exc: ToolkitError) -> JSONResponse:
        return error_answer(exc, config)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return internal_error_answer(exc)


async def _start_grpc(state: ServerState) -> Any:
    """The v2 gRPC endpoint (serve.grpc) in this event loop; if it cannot start, the server stops with
    the reason (a missing package names what to install), as for a model that cannot load."""
    try:
        from .grpc import start

        return await start(state)
    except (ImportError, OSError) as exc:
        state.fatal = str(exc)
        log.error("cannot serve gRPC: %s", exc)
        if state.on_fatal is not None:
            state.on_fatal()
        return None
