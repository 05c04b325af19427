"""What both ends of the channel between a front-end worker and the inference process share.

Control messages are pickled tuples behind a 4-byte length (`_frame`, `_read`) on a Unix socket;
batches travel through a `multiprocessing.shared_memory` block per worker, cut into slots of
`SLOT_BUDGET` in all (`_attach` maps it in a worker, `_close_shm` releases it in the inference
process). Also the little process setup every serving process does the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import pickle
import struct
from multiprocessing.shared_memory import SharedMemory
from typing import Any

_FRAME = struct.Struct("!I")
SLOT_BUDGET = 64 * 1024 * 1024  # shared memory per worker (pages are only used once touched)


# --- framing --------------------------------------------------------------------------------------

def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    head = await reader.readexactly(_FRAME.size)
    return pickle.loads(await reader.readexactly(_FRAME.unpack(head)[0]))  # type: ignore[no-any-return]


# --- shared memory ---------------------------------------------------------------------------------

def _attach(name: str, size: int) -> mmap.mmap:
    """Map the inference process's shared memory without registering it with a resource tracker (the
    creator unlinks it; a tracker in this process would unlink it again, or warn, at exit)."""
    with open(f"/dev/shm/{name}", "r+b") as handle:
        return mmap.mmap(handle.fileno(), size)


def _close_shm(shm: SharedMemory | None) -> None:
    if shm is None:
        return
    with contextlib.suppress(BufferError, FileNotFoundError, OSError):
        shm.close()
    with contextlib.suppress(FileNotFoundError, OSError):
        shm.unlink()


# --- process setup, the same in every process ------------------------------------------------------

def default_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _run(main: Any, loop_factory: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


def _name_process(name: str) -> None:
    """Name this process as `ps`/`top` show it (Linux; threads started later inherit the name)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s:     [%(process)d] %(message)s")
