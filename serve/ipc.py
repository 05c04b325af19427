"""Typed messages between the serving processes, each declared once, and the setup every process shares.

    parent (supervisor) <-pipe-> inference process <-Unix socket-> worker 0 .. N-1
                         <-pipe- worker (start failures only)

Every message is a frozen dataclass; `send`/`receive` frame one pickled message behind a 4-byte length
on a stream, and receivers dispatch with `match` on the class. A failure crosses as `Failure`: the
HTTP status, the error class and the message, so the receiving side raises the same typed error the
sending side caught. The anchor is Triton python_backend's command enum plus message struct
(`src/ipc_message.h`): one declared command per exchange, never positional tuples.

Batches travel through a `multiprocessing.shared_memory` block per worker, cut into slots (`attach` maps
it in a worker, `close_shm` releases it in the inference process); larger ones travel inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import pickle
import struct
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.runtime.cpu import usable_cores

from . import errors

_FRAME = struct.Struct("!I")
SLOT_BUDGET = 64 * 1024 * 1024  # shared memory per worker (pages are only used once touched)
Snapshot = dict[str, Any]  # `Stats.snapshot()`: plain, picklable counters


class Message:
    """Base of every message: pickled as (class, field values), rebuilt by its constructor (a frozen
    slotted dataclass's own pickling goes through Python-level __getstate__/__setstate__, several
    microseconds per message on the inference hot path)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        fields: tuple[str, ...] = self.__slots__  # a dataclass(slots=True): its fields, in order
        return type(self), tuple(getattr(self, name) for name in fields)


# --- failures ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Failure(Message):
    """An error that crossed a process boundary: raised again on the other side as the same class."""

    status: int
    error: str  # the class name: one of serve.errors' or a ToolkitError subclass known here
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, ToolkitError):
            return cls(exc.http_status, type(exc).__name__, str(exc))
        return cls(500, type(exc).__name__, f"{type(exc).__name__}: {exc}")

    def exception(self) -> Exception:
        known = getattr(errors, self.error, None)
        if isinstance(known, type) and issubclass(known, ToolkitError) and known.http_status == self.status:
            return known(self.message)
        if self.status >= 500 and self.status not in (503, 504):
            return RuntimeError(self.message)  # the server's own failure: answered 500, logged
        error = ToolkitError(self.message)
        error.http_status = self.status  # type: ignore[misc]
        return error


# --- parent <-> inference process (a multiprocessing Pipe) --------------------------------------------

@dataclass(frozen=True, slots=True)
class HubUp(Message):
    """The inference process listens for workers."""


@dataclass(frozen=True, slots=True)
class HubFailed(Message):
    """The server cannot start (a model that must load did not): the parent exits 1 with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class WorkerUp(Message):
    """Worker `index` connected and holds every model: its start succeeded."""

    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class Serving(Message):
    """Every worker is up and every model that should be loaded is: the server was ready once."""


@dataclass(frozen=True, slots=True)
class WorkerRestarted(Message):
    index: int
    pid: int
    exitcode: int | None


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """The parent drains: the inference process lets requests finish, then exits."""


@dataclass(frozen=True, slots=True)
class StartFailed(Message):
    """A worker could not start (worker -> parent): the server stops with this reason."""

    reason: str


# --- worker <-> inference process (the Unix socket) ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello(Message):
    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The system shared-memory regions clients registered so far (a worker that starts later must
    know them too)."""

    regions: tuple[RegionCommand, ...] = ()


@dataclass(frozen=True, slots=True)
class Slots(Message):
    """A shared-memory block for one model's batches from one worker: `count` slots, each an input of
    up to `in_bytes` followed by its logits (`out_bytes`)."""

    shm_name: str
    count: int
    in_bytes: int
    out_bytes: int


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """Hold model `uid`: open `copies` of it here from `spec` (a model in every worker), or with `spec`
    None reach the inference process's copy through `slots`. Answered by `Attached`."""

    token: int
    uid: int
    name: str
    version: str
    settings: Any  # serve.repository.ModelSettings
    description: Any = None  # serve.models.ModelDescription of the shared copy
    spec: Any = None  # an opener (`RunnerSpec`) when the worker runs the model itself
    slots: Slots | None = None


@dataclass(frozen=True, slots=True)
class Attached(Message):
    token: int
    description: Any = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Detach(Message):
    """Let model `uid`'s requests finish, then free it. Answered by `Detached`."""

    token: int
    uid: int


@dataclass(frozen=True, slots=True)
class Detached(Message):
    token: int


@dataclass(frozen=True, slots=True)
class Publish(Message):
    """The repository index and which loaded model answers each (name, version)."""

    entries: tuple[Any, ...]  # serve.models.IndexEntry
    routes: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class Readiness(Message):
    ready: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Infer(Message):
    """A batch for model `uid`: in shared-memory slot `slot`, or inline (slot -1)."""

    request_id: int
    uid: int
    slot: int
    shape: tuple[int, ...]
    inline: bytes | None


@dataclass(frozen=True, slots=True)
class Inferred(Message):
    """The logits of request `request_id`: in its slot, or inline; and how long it queued and ran."""

    request_id: int
    shape: tuple[int, ...]
    inline: bytes | None
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """Request `request_id` failed (inference, a model control or shared-memory request)."""

    request_id: int
    failure: Failure


@dataclass(frozen=True, slots=True)
class Done(Message):
    """A model control or shared-memory request succeeded."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Control(Message):
    """Load or unload model `name` for the whole server (model control mode explicit)."""

    request_id: int
    action: str  # "load" | "unload"
    name: str


@dataclass(frozen=True, slots=True)
class RegionCommand(Message):
    """Register (all fields) or unregister (`key` None; `name` None: every region) a system shared-memory
    region, in every worker."""

    name: str | None
    key: str | None = None
    offset: int = 0
    byte_size: int = 0


@dataclass(frozen=True, slots=True)
class Regions(Message):
    """A worker applied `command` itself and asks the others to (request_id answered Done/Refused);
    the inference process sends it on with token -1 expecting `Applied`."""

    request_id: int
    command: RegionCommand


@dataclass(frozen=True, slots=True)
class Applied(Message):
    request_id: int


@dataclass(frozen=True, slots=True)
class StatsQuery(Message):
    request_id: int


@dataclass(frozen=True, slots=True)
class SnapshotQuery(Message):
    token: int


@dataclass(frozen=True, slots=True)
class Counters(Message):
    """Statistics: per loaded model (by uid) and the server's own; a worker's answer to SnapshotQuery
    (token), or the merged whole answering StatsQuery (request_id)."""

    request_id: int
    models: dict[int, Snapshot] = field(default_factory=dict)
    server: Snapshot = field(default_factory=dict)


# --- framing --------------------------------------------------------------------------------------

def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(data)) + data


def send(writer: asyncio.StreamWriter, message: object) -> None:
    """Queue one message on the stream (a closed stream drops it: its reader is gone)."""
    if not writer.is_closing():
        writer.write(frame(message))


async def receive(reader: asyncio.StreamReader) -> object:
    """The next message; raises IncompleteReadError when the other side closed the stream."""
    head = await reader.readexactly(_FRAME.size)
    return pickle.loads(await reader.readexactly(_FRAME.unpack(head)[0]))


# --- shared memory ---------------------------------------------------------------------------------

def attach(name: str, size: int) -> mmap.mmap:
    """Map the inference process's shared memory without registering it with a resource tracker (the
    creator unlinks it; a tracker in this process would unlink it again, or warn, at exit)."""
    with open(f"/dev/shm/{name}", "r+b") as handle:
        return mmap.mmap(handle.fileno(), size)


def close_shm(shm: SharedMemory | None) -> None:
    if shm is None:
        return
    with contextlib.suppress(BufferError, FileNotFoundError, OSError):
        shm.close()
    with contextlib.suppress(FileNotFoundError, OSError):
        shm.unlink()


# --- process setup, the same in every process ------------------------------------------------------

def default_cores() -> int:
    """The logical CPUs this process may run on (toolkit/runtime/cpu.py counts them for everyone)."""
    return usable_cores()


def run(main: Any, loop_factory: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


def loop_factory() -> Any:
    """uvloop's event loop where installed (as uvicorn picks it), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


def name_process(name: str) -> None:
    """Name this process as `ps`/`top` show it (Linux; threads started later inherit the name)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s:     [%(process)d] %(message)s")
