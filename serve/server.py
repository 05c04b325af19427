"""Run the app under uvicorn with a graceful drain: SIGTERM -> not ready, new work 503, in-flight finish.

uvicorn's own handler stops listening at once; a load balancer then sees refused connections
instead of a clean 503 and an honest readiness probe. Here the first SIGTERM/SIGINT only starts
draining; the process exits (code 0) once no request is in flight, or after `drain_timeout_s`.
A second signal exits immediately. A port in use, or a model that must load and cannot, stops the
server: `serve` raises `ServeStartupError` with the reason (the CLI exits 1).

The connection layer is `serve.connection` (httptools with header size/time limits and a
connection cap); the request guard is `serve.guards`, behind it `serve.hotpath` answers the two
inference routes without FastAPI's per-request machinery. `serve` runs everything in this one process;
`serve.workers.serve_workers` (`toolkit serve --workers N`, N > 1) runs N such front ends as worker
processes sharing the listening socket, feeding one inference process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from . import ports
from .app import create_app
from .config import ServeConfig
from .connection import protocol_for
from .errors import ServeStartupError
from .guards import guarded
from .hotpath import HotPath
from .state import ServerState

log = logging.getLogger("toolkit.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain. Not `interruptible`: SIGINT is ignored (a worker process, whose
    parent drains it with SIGTERM; a terminal's Ctrl-C reaches every process of the group, and a second
    signal would cut the drain short)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, interruptible: bool = True) -> None:
        super().__init__(config)
        self.state = state
        self.interruptible = interruptible
        state.on_fatal = self._stop

    def _stop(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and not self.interruptible:
            return
        state = self.state
        if state.draining or state.loop is None:
            self.should_exit = True
            self.force_exit = state.draining
            return
        state.draining = True
        log.info("received %s: draining (%d requests in flight)", signal.Signals(sig).name,
                 state.counters.in_flight)
        state.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.config.drain_timeout_s
        while self.state.counters.in_flight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.05)
        self.should_exit = True


def uvicorn_config(models: Any, config: ServeConfig, app: Any = None,
                   **overrides: object) -> tuple[uvicorn.Config, ServerState]:
    app = app if app is not None else create_app(models, config)
    state: ServerState = app.state.toolkit
    options: dict[str, object] = {
        "host": config.host, "port": config.port, "log_level": "info", "access_log": False,
        "timeout_graceful_shutdown": config.drain_timeout_s, "lifespan": "on", "server_header": False,
        "http": protocol_for(config), "ws": "none", "timeout_keep_alive": config.keep_alive_s,
        "proxy_headers": False,  # nothing here reads the client's address: no middleware rewriting it
    }
    options.update(overrides)
    return uvicorn.Config(guarded(HotPath(app, state), state), **options), state  # type: ignore[arg-type]


def serve(models: Any, config: ServeConfig, **overrides: object) -> None:
    """Serve until SIGTERM/SIGINT, then drain. Blocks. `models`: a ModelSource (serve.repository), an
    opened Runner (the caller closes it afterwards) or an opener.

    Raises ServeStartupError when a port is in use or a model that must load cannot be served.
    """
    sock = ports.reserve(config.host, config.port, "", ports.HTTP_HINT)
    try:
        if config.grpc_port:
            ports.probe(config.host, config.grpc_port, ports.GRPC, ports.GRPC_HINT)
        sock.listen(2048)
        uv_config, state = uvicorn_config(models, config, **overrides)
        DrainingServer(uv_config, state).run(sockets=[sock])
    finally:
        sock.close()
    if state.fatal is not None:
        raise ServeStartupError(f"cannot serve: {state.fatal}")
