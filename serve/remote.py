"""The worker's side of multi-process serving: the model and the batcher as a front-end worker sees them.

`RemoteModel` describes the served model (card, backend, source) without running it; `RemoteBatcher`
stands in for the DynamicBatcher: it writes a request's batch into a free shared-memory slot (inline
when larger than a slot), sends it to the inference process and awaits the logits. It also follows
readiness as the inference process announces it, and answers 503 at once when that process is gone.

With a model in every worker (`shares_model=False`, the CPU default for ONNX Runtime) the worker
batches and runs its own requests; the link then only carries readiness (this worker's warm-up
reported by `warmed()`) and statistics, so `/metrics` still counts every process.
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

from toolkit.card import ModelCard
from toolkit.errors import ToolkitError
from toolkit.runtime.base import Runner

from .config import ServeConfig
from .errors import QueueFullError, QueueTimeoutError, ServiceUnavailableError
from .ipc import _attach, _frame, _read
from .metrics import RequestTiming, Stats

log = logging.getLogger("toolkit.serve")


class RemoteModel(Runner):
    """The served model's description in a worker (card, backend, source); it runs elsewhere."""

    def __init__(self, card: ModelCard, info: dict[str, Any]) -> None:
        super().__init__(card, source=info["source"], device=info["device"], precision=info["precision"],
                         max_batch_size=info.get("max_batch_size"))
        self.backend = info["backend"]
        self._describe = info.get("describe", {})

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise ServiceUnavailableError("a worker runs no model: inference goes through the batcher")

    def describe(self) -> dict[str, object]:
        return dict(self._describe)


@dataclass
class _Pending:
    future: asyncio.Future[np.ndarray]
    slot: int
    timing: RequestTiming


class RemoteBatcher:
    """`await infer(batch, timing)` in a worker; the DynamicBatcher of the inference process answers."""

    def __init__(self, path: str, index: int, runner: Runner, config: ServeConfig,
                 shares_model: bool = True) -> None:
        self.path, self.index, self.runner = path, index, runner
        self.shares_model = shares_model
        self.max_batch_size = config.max_batch_size
        self.timeout_s = config.timeout_s
        self.pending = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[int, _Pending] = {}
        self._stats_waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count()
        self._free: list[int] = []
        self._mmap: mmap.mmap | None = None
        self._in_bytes = self._slot_bytes = 0
        self._state: Any = None
        self.connected = False

    async def start(self, state: Any) -> None:
        self._state = state
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._writer.write(_frame(("hello", self.index, os.getpid(), self.shares_model)))
        kind, shm_name, slots, in_bytes, out_bytes, ready, reason = await _read(self._reader)
        assert kind == "welcome"
        if shm_name is not None:  # slots for batches: only when the model runs in the inference process
            self._mmap = _attach(shm_name, slots * (in_bytes + out_bytes))
            self._in_bytes, self._slot_bytes = in_bytes, in_bytes + out_bytes
            self._free = list(range(slots))[::-1]
        self.connected = True
        self._set_ready(ready, reason)
        self._task = asyncio.create_task(self._listen(), name="toolkit-remote")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
        self._fail_all("the worker is shutting down")

    def warmed(self) -> None:
        """This worker's own model is warmed up (a model per worker): the inference process decides
        when the whole server is ready."""
        with contextlib.suppress(ServiceUnavailableError):
            self._send(("warm",))

    def _set_ready(self, ready: bool, reason: str | None) -> None:
        state = self._state
        state.ready = bool(ready)
        state.warmup_error = None if ready else reason

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self.connected or self._writer is None or self._writer.is_closing():
            raise ServiceUnavailableError("the inference process is not running; the server is not ready")
        self._writer.write(_frame(message))

    async def infer(self, batch: np.ndarray, timing: RequestTiming | None = None) -> np.ndarray:
        timing = timing or RequestTiming()
        if not self.connected:
            raise ServiceUnavailableError("the inference process is not running; the server is not ready")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slot, inline = -1, None
        if batch.nbytes <= self._in_bytes and self._free:
            slot = self._free.pop()
            assert self._mmap is not None
            view = np.ndarray(batch.shape, np.float32, buffer=self._mmap, offset=slot * self._slot_bytes)
            view[...] = batch
        else:
            inline = batch.tobytes()
        request_id = next(self._ids)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = _Pending(future, slot, timing)
        try:
            self._send(("infer", request_id, slot, batch.shape, inline))
        except ServiceUnavailableError:
            self._release(request_id)
            raise
        try:  # the inference process enforces the timeout; this only guards against losing the answer
            async with asyncio.timeout(self.timeout_s + 10):
                return await future
        except TimeoutError:
            raise QueueTimeoutError(f"request timed out after {self.timeout_s:g} s (--timeout-s)") from None

    def _release(self, request_id: int) -> _Pending | None:
        pending = self._waiting.pop(request_id, None)
        if pending is not None and pending.slot >= 0:
            self._free.append(pending.slot)
        return pending

    async def gather_stats(self) -> Stats:
        """Every process's statistics merged (this worker's alone when the inference process is gone)."""
        if not self.connected:
            return Stats.merged([self._own_stats()])
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._stats_waiting[request_id] = future
        try:
            self._send(("stats", request_id))
            snapshot = await asyncio.wait_for(future, 10)
        except (TimeoutError, ServiceUnavailableError):
            return Stats.merged([self._own_stats()])
        finally:
            self._stats_waiting.pop(request_id, None)
        stats = Stats.merged([snapshot])
        self.pending = stats.pending
        return stats

    async def _listen(self) -> None:
        assert self._reader is not None and self._writer is not None
        # the loop ends when the inference process closes its end (it stopped or died): then fail over below
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                message = await _read(self._reader)
                kind = message[0]
                if kind == "ok":
                    self._answer(*message[1:])
                elif kind == "error":
                    self._error(*message[1:])
                elif kind == "snapshot":
                    self._writer.write(_frame(("snapshot", message[1], self._own_stats())))
                elif kind == "stats":
                    future = self._stats_waiting.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "ready":
                    self._set_ready(message[1], message[2])
        self.connected = False
        self._set_ready(False, "the inference process stopped")
        log.error("worker %d: lost the inference process; answering 503", self.index)
        self._fail_all("the inference process stopped; the server is not ready")

    def _own_stats(self) -> dict[str, Any]:
        """This worker's counters; with its own model, its own batcher's queue too."""
        state = self._state
        if state.batcher is not None and state.batcher is not self:
            state.stats.pending = state.batcher.pending
        return state.stats.snapshot()  # type: ignore[no-any-return]

    def _answer(self, request_id: int, shape: tuple[int, ...], inline: bytes | None, queue_s: float,
                infer_s: float, batch_size: int) -> None:
        pending = self._waiting.get(request_id)
        if pending is None:
            return
        if inline is not None:
            logits = np.frombuffer(inline, np.float32).reshape(shape)
        else:
            assert self._mmap is not None
            offset = pending.slot * self._slot_bytes + self._in_bytes
            logits = np.ndarray(shape, np.float32, buffer=self._mmap, offset=offset).copy()
        self._release(request_id)
        timing = pending.timing
        timing.queue_s, timing.infer_s, timing.batch_size = queue_s, infer_s, batch_size
        if not pending.future.done():
            pending.future.set_result(logits)

    def _error(self, request_id: int, kind: str, status: int, message: str) -> None:
        pending = self._release(request_id)
        if pending is None or pending.future.done():
            return
        error: Exception
        if kind == "full":
            error = QueueFullError(message)
        elif kind == "timeout":
            error = QueueTimeoutError(message)
        elif kind == "toolkit":
            error = ToolkitError(message)
            error.http_status = status  # type: ignore[attr-defined]
        else:
            error = RuntimeError(message)
        pending.future.set_exception(error)

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self._waiting):
            pending = self._release(request_id)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(ServiceUnavailableError(reason))
        for future in self._stats_waiting.values():
            if not future.done():
                future.set_exception(ServiceUnavailableError(reason))
