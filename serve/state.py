"""What every route shares, as one object, handed to routes by the FastAPI dependency `get_state`.

Routes ask the state the questions they all need answered (is this our model, are we ready, run
this in the decode pool, account for this inference request) instead of closing over locals, so a
route module is plain functions and a second front end (gRPC) can drive the same state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from toolkit.errors import ToolkitError
from toolkit.runtime.base import Runner

from .batcher import DynamicBatcher
from .config import ServeConfig
from .errors import NotFoundError, QueueFullError, QueueTimeoutError, ServiceUnavailableError
from .metrics import RequestTiming, Stats
from .protocol import ProtocolState

T = TypeVar("T")
INLINE_BYTES = 16 * 1024  # inputs up to this size are decoded on the event loop (`ServerState.offload`)
R = TypeVar("R")


@dataclass
class ServerState:
    """Everything the routes share. `ready` flips after warm-up; `draining` on SIGTERM."""

    config: ServeConfig
    runner: Runner
    stats: Stats = field(default_factory=Stats)
    extensions: ProtocolState = field(default_factory=ProtocolState)  # settings, shared-memory regions
    batcher: DynamicBatcher | None = None
    pool: ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
    ready: bool = False
    draining: bool = False
    warmup_error: str | None = None
    on_fatal: Callable[[], None] | None = None  # set by the server: stop when the model cannot run
    remote: Any = None  # serve.remote.RemoteBatcher in a front-end worker process; None: one process

    async def current_stats(self) -> Stats:
        """The statistics to report: this process's, or in a worker, all processes' merged."""
        if self.remote is not None:
            return await self.remote.gather_stats()  # type: ignore[no-any-return]
        if self.batcher is not None:
            self.stats.pending = self.batcher.pending
        return self.stats

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def check_model(self, name: str, version: str | None = None) -> None:
        config = self.config
        if name != config.name or (version not in (None, "", config.version)):
            shown = name if version in (None, "") else f"{name} version {version}"
            raise NotFoundError(f"unknown model {shown!r}; this server serves {config.name!r} "
                                f"version {config.version}")

    def require_ready(self) -> DynamicBatcher:
        if self.draining:
            raise ServiceUnavailableError("server is shutting down")
        if not self.ready or self.batcher is None:
            reason = f" ({self.warmup_error})" if self.warmup_error else ""
            raise ServiceUnavailableError(f"model is not ready yet{reason}")
        return self.batcher

    async def in_pool(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (decoding, parsing) in the decode pool, off the event loop."""
        assert self.loop is not None
        return await self.loop.run_in_executor(self.pool, lambda: func(*args, **kwargs))

    async def offload(self, size: int, func: Callable[..., T], *args: Any, inline_below: int = INLINE_BYTES,
                      **kwargs: Any) -> T:
        """Work on an input of `size` bytes: on the event loop when small, else in the decode pool.

        Handing work to a thread and back costs about 50 µs of CPU (a queue, a lock, a wake-up of the
        loop): more than decoding a CIFAR-size PNG (~30 µs). Large inputs (photos, big JSON) still
        go to the pool, so one cannot hold the loop for milliseconds."""
        if size <= inline_below:
            return func(*args, **kwargs)
        return await self.in_pool(func, *args, **kwargs)

    async def counted(self, work: Callable[[RequestTiming], Awaitable[R]]) -> R:
        """Run one inference request and account for it as Triton does (success/failure, phases)."""
        stats = self.stats
        timing, started = RequestTiming(), time.perf_counter()
        try:
            response = await work(timing)
        except QueueFullError:
            stats.record_failure("REJECTED", time.perf_counter() - started)
            raise
        except QueueTimeoutError:
            stats.record_failure("CANCELED", time.perf_counter() - started)
            raise
        except ToolkitError:
            stats.record_failure("OTHER", time.perf_counter() - started)
            raise
        except Exception:
            stats.record_failure("BACKEND", time.perf_counter() - started)
            raise
        if getattr(response, "status_code", 200) < 400:  # gRPC answers are not HTTP responses
            stats.record_success(time.perf_counter() - started, timing)
        else:
            stats.record_failure("OTHER", time.perf_counter() - started)
        return response


async def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request. Async on purpose: FastAPI runs a
    plain-function dependency in its thread pool, a thread hop per request."""
    return request.app.state.toolkit  # type: ignore[no-any-return]
