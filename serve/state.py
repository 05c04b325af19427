"""What every route and both transports share: one `infer`, one `authorised`, one index, one statistics.

HTTP routes (`serve.routes`), the hot path (`serve.hotpath`) and gRPC (`serve.grpc`) only decode and
encode; everything between is here, once, as Triton's HTTP and gRPC front ends both call one
`ServerInferAsync`: finding the model (404/503), draining, the model's in-flight count (what an unload
waits for), the timed phases (decode -> batcher -> encode) and the statistics of success and failure.

A front-end worker (serve.workers) holds a `link` to the inference process (serve.remote.HubLink): the
statistics are then every process's, and model control and shared-memory registration act on the
whole server through it. In a single process `control` (serve.control) acts directly.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request

from toolkit.errors import InputError, ToolkitError

from . import protocol
from .config import ServeConfig
from .errors import QueueFullError, QueueTimeoutError, RepositoryControlError, ServiceUnavailableError
from .ipc import RegionCommand
from .metrics import RequestTiming, ServerCounters, Stats, exposition
from .models import ModelTable, ServedModel
from .protocol import ProtocolState

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")
INLINE_BYTES = 16 * 1024  # inputs up to this size are decoded on the event loop (`ServerState.offload`)
Decode = Callable[[ServedModel], Awaitable[tuple[P, np.ndarray | None]]]
Encode = Callable[[ServedModel, P, np.ndarray | None], R]


@dataclass
class ServerState:
    """Everything the transports share. `ready`: every model that should be loaded is; `draining` on
    SIGTERM; `unavailable`: why no inference can run at all (the inference process is gone)."""

    config: ServeConfig
    models: ModelTable = field(default_factory=ModelTable)
    counters: ServerCounters = field(default_factory=ServerCounters)
    extensions: ProtocolState = field(default_factory=ProtocolState)  # settings, shared-memory regions
    control: Any = None  # serve.control.ModelControl: this process controls the models
    link: Any = None  # serve.remote.HubLink: a worker; the inference process controls them
    pool: ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
    ready: bool = False
    not_ready: str | None = "loading models"
    draining: bool = False
    unavailable: str | None = None
    fatal: str | None = None  # why the server stopped itself (a model that must load did not)
    on_fatal: Callable[[], None] | None = None  # set by the server: stop when it cannot serve

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def readiness_reason(self) -> str:
        return "draining" if self.draining else (self.fatal or self.not_ready or "not ready")

    # --- the one API-key check ------------------------------------------------------------------

    def authorised(self, api_key: str | None, authorization: str | None) -> bool:
        """`X-API-Key: KEY` or `Authorization: Bearer KEY` (HTTP headers or gRPC metadata)."""
        key = self.config.api_key
        if not key:
            return True
        given = api_key
        if given is None and authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        return given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), key.encode())

    # --- models -----------------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The loaded model `name` (its latest version unless `version`): 404 unknown, 503 not loaded."""
        return self.models.lookup(name, version or None)

    def pick(self, name: str | None) -> ServedModel:
        """/predict's model: the one named, or the only one served."""
        if name:
            return self.model(name)
        served = self.models.routes
        if len(served) == 1:
            return self.model(next(iter(served)))
        if not served:
            raise ServiceUnavailableError(f"no model is loaded ({self.readiness_reason()})")
        raise InputError(f"this server serves {len(served)} models ({', '.join(sorted(served))}): name one "
                         "with ?model=NAME")

    # --- the one inference core ---------------------------------------------------------------------

    async def infer(self, model: ServedModel, decode: Decode[P], encode: Encode[P, R]) -> R:
        """One inference request: decode (-> the model's float32 batch, or None: nothing to run), the
        model's batcher, encode; accounted as Triton does (success/failure reasons, phase durations)."""
        if self.draining:
            raise ServiceUnavailableError("server is shutting down")
        if self.unavailable:
            raise ServiceUnavailableError(self.unavailable)
        stats, timing = model.stats, RequestTiming()
        model.enter()
        started = time.perf_counter()
        try:
            parsed, batch = await decode(model)
            began = time.perf_counter()
            timing.input_s = began - started
            logits = None if batch is None else await model.batcher.infer(batch, timing)
            began = time.perf_counter()
            response = encode(model, parsed, logits)
            timing.output_s = time.perf_counter() - began
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
        finally:
            model.leave()
        if getattr(response, "status_code", 200) < 400:  # gRPC answers are not HTTP responses
            stats.record_success(time.perf_counter() - started, timing)
        else:
            stats.record_failure("OTHER", time.perf_counter() - started)
        return response

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count work in flight: draining waits for it (HTTP counts every POST in `guards.Accounting`)."""
        self.counters.in_flight += 1
        try:
            yield
        finally:
            self.counters.in_flight -= 1

    # --- statistics ------------------------------------------------------------------------------------

    async def current_stats(self) -> tuple[dict[int, Stats], ServerCounters]:
        """Every loaded model's statistics by uid, and the server's counters: this process's, or in a
        worker, every process's merged."""
        if self.link is not None:
            return await self.link.gather_stats()  # type: ignore[no-any-return]
        for model in self.models.models.values():
            model.stats.pending = model.batcher.pending
        return {uid: model.stats for uid, model in self.models.models.items()}, self.counters

    async def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics extension document, for one model or every loaded one."""
        models = [self.model(name, version)] if name else self.models.served()
        stats, _ = await self.current_stats()
        documents = [stats.get(m.uid, m.stats).v2_statistics(m.name, m.version,
                                                             protocol.memory_usage(m.description.source))
                     for m in models]
        return {"model_stats": [entry for document in documents for entry in document["model_stats"]]}

    async def metrics(self) -> str:
        stats, counters = await self.current_stats()
        return exposition([(m.name, m.version, stats.get(m.uid, m.stats)) for m in self.models.served()],
                          counters)

    # --- the whole server: model control and shared-memory regions ---------------------------------------

    async def load(self, name: str) -> None:
        if self.link is not None:
            await self.link.control("load", name)
        elif self.control is not None:
            await self.control.load(name)
        else:
            raise RepositoryControlError("explicit model load / unload is not allowed if polling is enabled")

    async def unload(self, name: str) -> None:
        if self.link is not None:
            await self.link.control("unload", name)
        elif self.control is not None:
            await self.control.unload(name)
        else:
            raise RepositoryControlError("explicit model load / unload is not allowed if polling is enabled")

    async def register_region(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Register a system shared-memory region for every process (whichever worker is asked next)."""
        self.extensions.shm.register(name, key, offset, byte_size)
        if self.link is not None:
            try:
                await self.link.regions(RegionCommand(name, key, offset, byte_size))
            except BaseException:
                self.extensions.shm.unregister(name)
                raise

    async def unregister_region(self, name: str | None) -> None:
        self.extensions.shm.unregister(name)
        if self.link is not None:
            await self.link.regions(RegionCommand(name))

    # --- running work off the event loop -------------------------------------------------------------------

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


async def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request. Async on purpose: FastAPI runs a
    plain-function dependency in its thread pool, a thread hop per request."""
    return request.app.state.toolkit  # type: ignore[no-any-return]
