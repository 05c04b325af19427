"""Decode and resize image files on all cores, results in input order, one error per bad file.

Pillow releases the GIL while it decodes and resamples, so threads scale with cores and cost
nothing to start; processes were measured against them (bench/bench_gpu.py `decode` table, and
the figures in the README's GPU section) and are kept as an option (`kind="process"`) for
machines where a decoder holds the GIL. Work is submitted a bounded window ahead of the consumer,
so the pool never idles at batch boundaries and memory stays bounded.

Small images cost as much in overhead as in decoding (a 32x32 JPEG: about 90 µs of Pillow), so
(bench/bench_folder.py; issue 18 item 6) batches are decoded in runs of consecutive files, one task
per run (`chunk`) instead of one future per file, and small files are read whole in one system call
(`small_file_bytes`) instead of through the JPEG plugin's thirty-odd buffered reads.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np

from .errors import UsageError
from .runtime.cpu import usable_cores

if TYPE_CHECKING:  # pragma: no cover
    from .card import ModelCard

T = TypeVar("T")
R = TypeVar("R")
POOL_KINDS = ("thread", "process")
MAX_CHUNK = 32  # files per task in `batches`: the hand-over cost spread, every worker still busy
SMALL_FILE = 1 << 20  # files up to this size are read whole, in one system call (`small_file_bytes`)


def default_workers() -> int:
    """The cores this process may run on (toolkit/runtime/cpu.py counts them for every pool)."""
    return usable_cores()


def resolve_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if workers < 1:
        raise UsageError(f"--workers must be positive, got {workers}")
    return int(workers)


def small_file_bytes(path: str | Path, limit: int = SMALL_FILE) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes, by one open, fstat and read; None for a
    larger file (stream it) and for anything that is not a regular file (`require_file` names it).

    O_NONBLOCK: a FIFO or a device is found by `fstat` and refused, never waited on. For a 1 kB JPEG
    this saves about a quarter of the decode: stat + open + the plugin's thirty-odd buffered reads
    cost about 30 µs, Pillow's decoding about 90 µs (bench/bench_folder.py; issue 18 item 6)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # the caller's open names the problem
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = os.read(fd, info.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == info.st_size else None  # changed since fstat: stream it


def load_uint8(path: Path, card: ModelCard, name: str | None = None) -> np.ndarray:
    """One file -> uint8 HxWx3 at the card's input size (JPEGs drafted at reduced scale first).

    Small files are read whole first (`small_file_bytes`); others, and anything that is not a regular
    file, go to `decode_image` by path, which refuses them with its own message. Module-level
    (picklable) so a process pool can run it; the error it raises names the file (or `name`).
    """
    from .images import decode_image
    from .preprocess import to_uint8

    data = small_file_bytes(path)
    draft = (card.resize_size, card.resize_size)
    image = decode_image(data if data is not None else path, draft_size=draft, name=name or str(path))
    return to_uint8(image, card)


def _run(fn: Callable[[T], R], items: Sequence[T]) -> list[tuple[bool, Any]]:
    """fn over a run of items in one task: (True, result) or (False, its exception) per item, so each
    error is raised at its own item's position (module-level: a process pool pickles it)."""
    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            out.append((True, fn(item)))
        except Exception as exc:  # noqa: BLE001 - re-raised where the consumer reaches this item
            out.append((False, exc))
    return out


def _unpack(results: list[tuple[bool, Any]]) -> Iterator[Any]:
    for ok, value in results:
        if not ok:
            raise value
        yield value


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

    def __enter__(self) -> Self:
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

    def map(self, fn: Callable[[T], R], items: Iterable[T], window: int | None = None,
            chunk: int = 1) -> Iterator[R]:
        """fn(item) for each item, in order, at most about `window` items (default 4 per worker) in
        flight, in tasks of `chunk` consecutive items."""
        if self._executor is None:
            with self:
                yield from self.map(fn, items, window, chunk)
            return
        executor = self._executor
        chunk = max(1, chunk)
        ahead = max(1, -(-(window or 4 * self.workers) // chunk))  # in tasks
        pending: deque[Future[list[tuple[bool, Any]]]] = deque()
        iterator = iter(items)
        try:
            while part := list(islice(iterator, chunk)):
                pending.append(executor.submit(_run, fn, part))
                if len(pending) >= ahead:
                    yield from _unpack(pending.popleft().result())
            while pending:
                yield from _unpack(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()

    def batches(self, fn: Callable[[T], np.ndarray], items: list[T], batch_size: int) -> Iterator[np.ndarray]:
        """Stacked batches of fn(item), in order; the window spans batch boundaries, tasks are runs of
        up to `MAX_CHUNK` files (fewer when that would leave a worker without a share of a batch)."""
        chunk = max(1, min(MAX_CHUNK, batch_size // self.workers))
        results = self.map(fn, items, window=batch_size + 2 * self.workers * chunk, chunk=chunk)
        for start in range(0, len(items), batch_size):
            count = min(batch_size, len(items) - start)
            yield np.stack([next(results) for _ in range(count)])
