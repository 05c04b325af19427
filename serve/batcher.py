"""Dynamic batching: concurrent requests share one runner call; each answer returns to its sender.

One scheduler task on the event loop takes queued requests in arrival order and hands them, as one
concatenated batch, to a single runner thread (the runner never runs on the event loop). While
that thread works, new requests queue up and form the next batch, so under load batches grow by
themselves; `max_delay_ms` optionally holds a batch open a little longer (worth it on GPUs). The
queue is bounded (`QueueFullError` -> 503) and every request has a deadline (`QueueTimeoutError`
-> 504). Requests larger than `max_batch_size` run alone and the Runner chunks them.

`instances` (the inference process, `serve.inference`, on CPUs) gives the one queue several copies of
the model, each on its own thread with its share of the cores: a batch forms whenever a copy is idle,
so one batcher still sees every request (as Triton's instance groups).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import UsageError
from toolkit.runtime.base import Runner

from .errors import QueueFullError, QueueTimeoutError
from .metrics import RequestTiming, Stats

if TYPE_CHECKING:
    from .models import ServedModel

__all__ = ["BatchedRunner", "DynamicBatcher", "QueueFullError", "QueueTimeoutError"]


@dataclass(eq=False)  # identity: `item in queue` must not compare the batches
class _Item:
    batch: np.ndarray
    future: asyncio.Future[np.ndarray]
    timing: RequestTiming
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """`await batcher.infer(float32 NCHW)` -> logits; gathers concurrent calls into one runner call."""

    def __init__(self, runner: Runner, stats: Stats, *, max_batch_size: int = 32, max_delay_ms: float = 0.0,
                 max_queue: int = 256, timeout_s: float = 30.0,
                 instances: list[Runner] | None = None) -> None:
        self.runner = runner
        self.instances = list(instances or [runner])
        self._idle: collections.deque[Runner] = collections.deque(self.instances)
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.stats = stats
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, max_delay_ms / 1000.0)
        self.max_queue = max(1, int(max_queue))
        self.timeout_s = timeout_s
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=len(self.instances),
                                            thread_name_prefix="toolkit-runner")

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._free = asyncio.Semaphore(len(self.instances))
        self._task = asyncio.create_task(self._schedule(), name="toolkit-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(QueueFullError("the server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def run_sync(self, batch: np.ndarray, instance: Runner | None = None) -> np.ndarray:
        """Run directly on a runner thread (warm-up), bypassing the queue."""
        return self._executor.submit(instance or self.runner, batch).result()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def infer(self, batch: np.ndarray, timing: RequestTiming | None = None) -> np.ndarray:
        """Logits for `batch`; raises QueueFullError (503) or QueueTimeoutError (504)."""
        if self._wakeup is None:
            raise QueueFullError("the model is not running yet")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"server busy: {len(self._queue)} requests already queued (--max-queue "
                                 f"{self.max_queue}); retry later")
        item = _Item(batch, asyncio.get_running_loop().create_future(), timing or RequestTiming())
        self._queue.append(item)
        self.stats.pending = len(self._queue)
        self._wakeup.set()
        try:  # a timeout, not wait_for(shield(...)): no extra task and future per request
            async with asyncio.timeout(self.timeout_s):
                return await item.future
        except TimeoutError:
            if item in self._queue:
                self._queue.remove(item)
                self.stats.pending = len(self._queue)
            item.future.cancel()
            raise QueueTimeoutError(f"request timed out after {self.timeout_s:g} s (--timeout-s)") from None

    def _take(self) -> list[_Item]:
        items: list[_Item] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if items and size + len(head.batch) > self.max_batch_size:
                break
            self._queue.popleft()
            if head.future.done():  # timed out while queued
                continue
            items.append(head)
            size += len(head.batch)
            if size >= self.max_batch_size:
                break
        self.stats.pending = len(self._queue)
        return items

    def _queued_images(self) -> int:
        return sum(len(item.batch) for item in self._queue)

    async def _schedule(self) -> None:
        assert self._wakeup is not None and self._free is not None
        several = len(self.instances) > 1
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if several:  # wait for an idle copy of the model; the queue grows meanwhile
                await self._free.acquire()
            if self.max_delay_s > 0:
                deadline = self._queue[0].enqueued + self.max_delay_s
                while (self._queued_images() < self.max_batch_size
                       and (left := deadline - time.perf_counter()) > 0):
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            items = self._take()
            if not items:
                if several:
                    self._free.release()
                continue
            if not several:
                await self._dispatch(items)
                continue
            task = asyncio.create_task(self._dispatch(items))
            self._running.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        assert self._free is not None
        self._free.release()

    async def _dispatch(self, items: list[_Item]) -> None:
        """One runner call for `items` on an idle copy of the model; each answer back to its request."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for item in items:
            item.timing.queue_s = started - item.enqueued
        runner = self._idle.popleft()
        try:
            batches = [i.batch for i in items]
            logits, infer_s = await loop.run_in_executor(self._executor, self._run, batches, runner)
        except BaseException as exc:
            for item in items:
                if not item.future.done():
                    error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                    item.future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self._idle.append(runner)
        self.stats.record_batch(len(logits), infer_s)
        offset = 0
        for item in items:
            n = len(item.batch)
            item.timing.infer_s = infer_s
            item.timing.batch_size = len(logits)
            if not item.future.done():
                item.future.set_result(logits[offset:offset + n])
            offset += n

    def _run(self, batches: list[np.ndarray], runner: Runner) -> tuple[np.ndarray, float]:
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        began = time.perf_counter()
        logits = runner(batch)
        return logits, time.perf_counter() - began


class BatchedRunner(Runner):
    """A Runner whose calls go through a served model's batcher, for library code run in a worker thread.

    `/evaluate` hands this to `toolkit.evaluate.evaluate`, so server-side evaluation shares the
    queue, the limits and the metrics with every other request, and the runner stays single-threaded.
    """

    def __init__(self, model: ServedModel, loop: asyncio.AbstractEventLoop) -> None:
        described = model.description
        super().__init__(described.card, source=described.source, device=described.device,
                         max_batch_size=model.settings.batch_limit, precision=described.precision)
        self.backend = described.backend
        self._model = model
        self._loop = loop

    @classmethod
    def open(cls, path: Any, *, device: str = "cpu") -> Runner:
        raise UsageError("a BatchedRunner wraps a running server's batcher; it is not opened from a file")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return asyncio.run_coroutine_threadsafe(self._model.batcher.infer(batch), self._loop).result()

    def describe(self) -> dict[str, object]:
        return dict(self._model.description.details)
