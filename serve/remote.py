"""A front-end worker's side of multi-process serving: its link to the inference process.

`HubLink` is the worker's one connection to the inference process (serve.inference). Over it the
inference process decides this worker's models: `Attach` makes the worker open a model itself (a
model in every worker, the CPU default for ONNX Runtime) or reach the inference process's copy through
a `RemoteBatcher`; `Detach` frees one once its requests finished; `Publish` says which model answers
each name. Readiness, statistics (every process's, merged), model control and system shared-memory
registrations (which must hold whichever worker a client reaches) all go through it too.

`RemoteBatcher` meets `serve.models.Batcher`: it writes a request's batch into a free slot of the
model's shared-memory block (inline when larger than a slot), sends it, and awaits the logits. When the
inference process is gone the worker is not ready and answers inference 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ServeConfig
from .control import open_served
from .errors import QueueTimeoutError, ServiceUnavailableError
from .ipc import (
    Applied,
    Attach,
    Attached,
    Control,
    Counters,
    Detach,
    Detached,
    Done,
    Failure,
    Hello,
    Infer,
    Inferred,
    Publish,
    Readiness,
    Refused,
    RegionCommand,
    Regions,
    Slots,
    SnapshotQuery,
    StatsQuery,
    Welcome,
    attach,
    receive,
    send,
)
from .metrics import RequestTiming, ServerCounters, Stats
from .models import ServedModel
from .repository import VersionSpec

log = logging.getLogger("toolkit.serve")
GONE = "the inference process is not running; the server is not ready"


@dataclass
class _Pending:
    future: asyncio.Future[np.ndarray]
    batcher: RemoteBatcher
    slot: int
    timing: RequestTiming


class RemoteBatcher:
    """A model's batcher in a worker when the inference process runs the model."""

    def __init__(self, link: HubLink, uid: int, settings: Any, slots: Slots | None) -> None:
        self.link, self.uid = link, uid
        self.max_batch_size = settings.batch_limit
        self.pending = 0
        self._mmap: mmap.mmap | None = None
        self._free: list[int] = []
        self.in_bytes = self.slot_bytes = 0
        if slots is not None:
            self.in_bytes, self.slot_bytes = slots.in_bytes, slots.in_bytes + slots.out_bytes
            self._mmap = attach(slots.shm_name, slots.count * self.slot_bytes)
            self._free = list(range(slots.count))[::-1]

    async def infer(self, batch: np.ndarray, timing: RequestTiming | None = None) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slot, inline = -1, None
        if self._mmap is not None and batch.nbytes <= self.in_bytes and self._free:
            slot = self._free.pop()
            np.ndarray(batch.shape, np.float32, buffer=self._mmap, offset=slot * self.slot_bytes)[...] = batch
        else:
            inline = batch.tobytes()
        return await self.link.infer(self, slot, batch.shape, inline, timing or RequestTiming())

    def logits(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        assert self._mmap is not None
        offset = slot * self.slot_bytes + self.in_bytes
        return np.ndarray(shape, np.float32, buffer=self._mmap, offset=offset).copy()

    def free(self, slot: int) -> None:
        if slot >= 0:
            self._free.append(slot)

    async def stop(self) -> None:
        if self._mmap is not None:  # no request is left: ServedModel.close waited for them
            with contextlib.suppress(BufferError):
                self._mmap.close()


class HubLink:
    """The worker's connection to the inference process."""

    def __init__(self, path: str, index: int, config: ServeConfig) -> None:
        self.path, self.index, self.config = path, index, config
        self.state: Any = None
        self.connected = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._inferring: dict[int, _Pending] = {}
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._work: set[asyncio.Task[None]] = set()

    async def start(self, state: Any) -> None:
        self.state = state
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        send(self._writer, Hello(self.index, os.getpid()))
        welcome = await receive(self._reader)
        assert isinstance(welcome, Welcome)
        for command in welcome.regions:
            self._apply(command)
        self.connected = True
        self._task = asyncio.create_task(self._listen(), name="toolkit-hub-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._work):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._fail_all("the worker is shutting down")
        for model in list(self.state.models.models.values()):
            await model.close(0)

    # --- requests to the inference process ----------------------------------------------------------

    def _send(self, message: object) -> None:
        if not self.connected or self._writer is None or self._writer.is_closing():
            raise ServiceUnavailableError(GONE)
        send(self._writer, message)

    async def infer(self, batcher: RemoteBatcher, slot: int, shape: tuple[int, ...], inline: bytes | None,
                    timing: RequestTiming) -> np.ndarray:
        request_id = next(self._ids)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._inferring[request_id] = _Pending(future, batcher, slot, timing)
        try:
            self._send(Infer(request_id, batcher.uid, slot, shape, inline))
        except ServiceUnavailableError:
            self._release(request_id)
            raise
        limit = self.config.timeout_s
        try:  # the inference process times requests out; this only guards against losing the answer
            async with asyncio.timeout(limit + 10):
                return await future
        except TimeoutError:
            self._release(request_id)
            raise QueueTimeoutError(f"request timed out after {limit:g} s (--timeout-s)") from None

    async def _ask(self, make: Any, within_s: float | None = None) -> Any:
        """Send `make(request_id)` and await its answer (Done, Counters, or the Refused failure raised)."""
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asked[request_id] = future
        try:
            self._send(make(request_id))
            async with asyncio.timeout(within_s):
                return await future
        finally:
            self._asked.pop(request_id, None)

    async def control(self, action: str, name: str) -> None:
        await self._ask(lambda request_id: Control(request_id, action, name))

    async def regions(self, command: RegionCommand) -> None:
        await self._ask(lambda request_id: Regions(request_id, command), within_s=30)

    async def gather_stats(self) -> tuple[dict[int, Stats], ServerCounters]:
        """Every process's statistics merged (this worker's alone when the inference process is gone)."""
        try:
            counters: Counters = await self._ask(StatsQuery, within_s=10)
        except (TimeoutError, ServiceUnavailableError):
            counters = self._snapshot(-1)
        stats = {uid: Stats.merged([snapshot]) for uid, snapshot in counters.models.items()}
        return stats, ServerCounters.merged([counters.server])

    def _snapshot(self, token: int) -> Counters:
        models = self.state.models.models
        for model in models.values():
            if not isinstance(model.batcher, RemoteBatcher):  # its own model: its own queue
                model.stats.pending = model.batcher.pending
        return Counters(token, {uid: m.stats.snapshot() for uid, m in models.items()},
                        self.state.counters.snapshot())

    # --- what the inference process says -----------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._reader is not None
        # the loop ends when the inference process closes its end (it stopped or died): then fail over below
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                self._dispatch(await receive(self._reader))
        self.connected = False
        state = self.state
        state.ready, state.not_ready = False, "the inference process stopped"
        state.unavailable = "the inference process stopped; the server is not ready"
        log.error("worker %d: lost the inference process; answering 503", self.index)
        self._fail_all(state.unavailable)

    def _dispatch(self, message: object) -> None:
        match message:
            case Inferred():
                self._answer(message)
            case Refused(request_id=request_id, failure=failure):
                self._refused(request_id, failure)
            case Done(request_id=request_id) | Counters(request_id=request_id) if request_id in self._asked:
                future = self._asked[request_id]
                if not future.done():
                    future.set_result(message)
            case Counters():
                pass  # an answer that came after its question timed out
            case Attach():
                self._spawn(self._attach(message))
            case Detach():
                self._spawn(self._detach(message))
            case Publish(entries=entries, routes=routes):
                self.state.models.publish(entries, routes)
            case Readiness(ready=ready, reason=reason):
                self.state.ready, self.state.not_ready = ready, reason
            case SnapshotQuery(token=token):
                self._send(self._snapshot(token))
            case Regions(request_id=token, command=command):
                self._apply(command)
                self._send(Applied(token))
            case _:
                log.error("worker %d: unexpected message %r", self.index, type(message).__name__)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _attach(self, order: Attach) -> None:
        settings = order.settings
        held = self.state.models.models.get(order.uid)
        if held is not None:  # asked twice (a load while this worker caught up): it holds it already
            self._send(Attached(order.token, held.description))
            return
        try:
            if order.spec is not None:
                spec = VersionSpec(order.name, order.version, order.spec, settings)
                model = await open_served(spec, order.uid, copies=1, warmup=self.config.warmup)
            else:
                model = ServedModel(order.uid, order.name, order.version, order.description, settings,
                                    RemoteBatcher(self, order.uid, settings, order.slots))
        except Exception as exc:  # noqa: BLE001 - the reason this model cannot load, for the whole server
            log.error("worker %d: %s", self.index, exc)
            self._send(Attached(order.token, failure=Failure.of(exc)))
            return
        self.state.models.models[order.uid] = model
        self._send(Attached(order.token, model.description))

    async def _detach(self, order: Detach) -> None:
        model = self.state.models.models.get(order.uid)
        if model is not None:
            await model.close(self.config.drain_timeout_s)
            self.state.models.models.pop(order.uid, None)
        self._send(Detached(order.token))

    def _apply(self, command: RegionCommand) -> None:
        """Another worker registered (or unregistered) a region: hold it here too."""
        registry = self.state.extensions.shm
        if command.key is None:
            registry.unregister(command.name)
            return
        try:
            registry.register(command.name, command.key, command.offset, command.byte_size)
        except Exception as exc:  # noqa: BLE001 - the asking worker already checked it; say why here
            log.error("worker %d: cannot map shared memory region %r: %s", self.index, command.name, exc)

    def _answer(self, answer: Inferred) -> None:
        pending = self._inferring.get(answer.request_id)
        if pending is None:
            return
        if answer.inline is not None:
            logits = np.frombuffer(answer.inline, np.float32).reshape(answer.shape)
        else:
            logits = pending.batcher.logits(pending.slot, answer.shape)
        self._release(answer.request_id)
        timing = pending.timing
        timing.queue_s, timing.infer_s, timing.batch_size = answer.queue_s, answer.infer_s, answer.batch_size
        if not pending.future.done():
            pending.future.set_result(logits)

    def _refused(self, request_id: int, failure: Failure) -> None:
        pending = self._release(request_id)
        future = pending.future if pending is not None else self._asked.get(request_id)
        if future is not None and not future.done():
            future.set_exception(failure.exception())

    def _release(self, request_id: int) -> _Pending | None:
        pending = self._inferring.pop(request_id, None)
        if pending is not None:
            pending.batcher.free(pending.slot)
        return pending

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self._inferring):
            pending = self._release(request_id)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(ServiceUnavailableError(reason))
        for future in self._asked.values():
            if not future.done():
                future.set_exception(ServiceUnavailableError(reason))
