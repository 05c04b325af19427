"""Decode and resize image files on all cores, results in input order, one error per bad file.

Pillow releases the GIL while it decodes and resamples, so threads scale with cores and cost
nothing to start; processes were measured against them (bench/bench_gpu.py `decode` table, and
the figures in the README's GPU section) and are kept as an option (`kind="process"`) for
machines where a decoder holds the GIL. Work is submitted a bounded window ahead of the consumer,
so the pool never idles at batch boundaries and memory stays bounded.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .card import ModelCard

T = TypeVar("T")
R = TypeVar("R")
POOL_KINDS = ("thread", "process")


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if workers < 1:
        raise UsageError(f"--workers must be positive, got {workers}")
    return int(workers)


def load_uint8(path: Path, card: ModelCard) -> np.ndarray:
    """One file -> uint8 HxWx3 at the card's input size (JPEGs drafted at reduced scale first).

    Module-level (picklable) so a process pool can run it; the error it raises names the file.
    """
    from .images import decode_image
    from .preprocess import to_uint8

    return to_uint8(decode_image(path, draft_size=(card.resize_size, card.resize_size)), card)


class DecodePool:
    """`map` a function over items on `workers` threads (default) or processes, in order.

    Each item's exception is re-raised at its own position, when the consumer reaches it, so a bad
    file is reported by its own error and the items before it are delivered first.
    """

    def __init__(self, workers: int | None = None, kind: str = "thread") -> None:
        if kind not in POOL_KINDS:
            raise UsageError(f"unknown decode pool kind {kind!r}; choose one of {', '.join(POOL_KINDS)}")
        self.workers = resolve_workers(workers)
        self.kind = kind
        self._executor: Executor | None = None

    def __enter__(self) -> DecodePool:  # noqa: PYI034 - typing.Self needs 3.11
        if self.kind == "process":
            import multiprocessing

            # forkserver/spawn: forking a process that holds torch/CUDA or running threads is unsafe
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        else:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="toolkit-decode")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, fn: Callable[[T], R], items: Iterable[T], window: int | None = None) -> Iterator[R]:
        """fn(item) for each item, in order, at most `window` (default 4 per worker) in flight."""
        if self._executor is None:
            with self:
                yield from self.map(fn, items, window)
            return
        executor = self._executor
        ahead = max(1, window or 4 * self.workers)
        pending: deque[Future[R]] = deque()
        iterator = iter(items)
        try:
            for item in iterator:
                pending.append(executor.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def batches(self, fn: Callable[[T], np.ndarray], items: list[T], batch_size: int) -> Iterator[np.ndarray]:
        """Stacked batches of fn(item), in order; the window spans batch boundaries."""
        results = self.map(fn, items, window=max(4 * self.workers, batch_size + 2 * self.workers))
        for start in range(0, len(items), batch_size):
            count = min(batch_size, len(items) - start)
            yield np.stack([next(results) for _ in range(count)])
