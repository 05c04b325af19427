"""The FastAPI app: routers (`serve.routes`), the shared state, error handlers, and warm-up.

`create_app(runner, config)` builds the app around one opened Runner. Readiness is honest: the
model is warmed up in the background and `/v2/health/ready` says 503 until that finished, and again
once draining began; a model whose warm-up fails stops the server (`toolkit serve` exits 1 with the
reason) instead of leaving it up and never ready. Every client mistake is a 4xx with
`{"error": ...}`; the guard middlewares (`serve.guards`) run before any route.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.errors import ToolkitError
from toolkit.runtime.base import Runner

from .batcher import DynamicBatcher
from .config import ServeConfig
from .errors import error_answer, error_response, internal_error_answer
from .ipc import _name_process
from .routes import ROUTERS
from .state import ServerState

log = logging.getLogger("toolkit.serve")


def create_app(runner: Runner, config: ServeConfig, remote: Any = None) -> FastAPI:
    """The server around one opened Runner (the caller keeps ownership and closes it).

    In a front-end worker process (`serve.workers`), `remote` (a `serve.remote.RemoteBatcher`) links
    it to the inference process, which decides readiness and merges the statistics. When the model
    is shared, `runner` only describes it and `remote` stands in for the batcher; when every worker
    runs its own model, `runner` is that model and `remote` hears of its warm-up.
    """
    state = ServerState(config=config, runner=runner, remote=remote)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        state.loop = asyncio.get_running_loop()
        state.pool = ThreadPoolExecutor(max_workers=max(1, config.decode_workers),  # named for `top -H`
                                        thread_name_prefix="toolkit-decode", initializer=_name_process,
                                        initargs=("toolkit-decode",))
        if remote is not None:
            await remote.start(state)
        if remote is not None and remote.shares_model:
            state.batcher = remote
        else:
            state.batcher = DynamicBatcher(runner, state.stats, max_batch_size=config.max_batch_size,
                                           max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                                           timeout_s=config.timeout_s)
            await state.batcher.start()
        grpc_server = await _start_grpc(state) if config.grpc_port else None
        warm = asyncio.create_task(_warm_up(state) if state.batcher is not remote else asyncio.sleep(0))
        try:
            yield
        finally:
            warm.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=min(5.0, config.drain_timeout_s))
            state.extensions.shm.close()
            await state.batcher.stop()
            if remote is not None and state.batcher is not remote:
                await remote.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="toolkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.toolkit = state
    for router in ROUTERS:
        app.include_router(router)
    _add_error_handlers(app, config)
    return app


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
    the reason (a missing package names what to install), as for a failed warm-up."""
    try:
        from .grpc import start

        return await start(state)
    except (ImportError, OSError) as exc:
        state.warmup_error = str(exc)
        log.error("cannot serve gRPC: %s", exc)
        if state.on_fatal is not None:
            state.on_fatal()
        return None


async def _warm_up(state: ServerState) -> None:
    """Run the model once at batch 1 and once at the largest batch before saying ready.

    A failure means the server can never answer: it is logged with the reason and the server is
    stopped (`state.on_fatal`), so `toolkit serve` exits 1 instead of staying up and never ready.
    """
    assert state.batcher is not None
    card = state.runner.card
    try:
        if state.config.warmup:
            loop = asyncio.get_running_loop()
            for size in sorted({1, max(1, state.config.max_batch_size)}):
                batch = np.zeros((size, *card.input_size), dtype=np.float32)
                await loop.run_in_executor(None, state.batcher.run_sync, batch)
        if state.remote is not None:  # one worker of several: the inference process says when all are
            state.remote.warmed()
            log.info("model %s warmed up in this worker", state.config.name)
        else:
            state.ready = True
            log.info("model %s ready", state.config.name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the reason the server stops, not a traceback
        state.warmup_error = f"warm-up failed: {exc}" if str(exc) else f"warm-up failed: {type(exc).__name__}"
        log.error("model %s cannot be served: %s", state.config.name, state.warmup_error)
        if state.on_fatal is not None:
            state.on_fatal()
