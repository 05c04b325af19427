"""Multi-process serving: front-end worker processes feeding one inference process through shared memory.

    parent (supervisor)  binds the port, starts the processes, restarts dead workers, drains on SIGTERM
      |- inference process  opens the Runner, warms it up, runs the one DynamicBatcher
      |- worker 0 .. N-1    uvicorn, each on its own SO_REUSEPORT socket on the port: HTTP parsing, limits,
                            API key, decoding and preprocessing; worker 0 also serves gRPC

Workers talk to the inference process over a Unix socket (small pickled control messages) and hand
it float32 batches through a `multiprocessing.shared_memory` block per worker, cut into slots: the
worker writes a request's batch into a free slot, sends (request id, slot, shape), and the inference
process feeds a view of the slot to the batcher, so requests from every worker meet in one runner
call, then writes the logits back into the slot. Requests larger than a slot travel inline.

Readiness is decided by the inference process: ready once the model is warmed up and every worker is
connected; it tells the workers whenever that changes. A worker whose inference process is gone is
not ready and answers inference 503 at once (pending requests too). Statistics: each process counts
its own share (workers the requests, the inference process the runner calls); `/metrics` and the v2
statistics ask the inference process, which gathers every worker's snapshot and merges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from toolkit.card import ModelCard
from toolkit.errors import ToolkitError
from toolkit.runtime.base import Runner

from .config import ServeConfig
from .errors import QueueFullError, QueueTimeoutError, ServeStartupError, ServiceUnavailableError
from .metrics import RequestTiming, Stats

log = logging.getLogger("toolkit.serve")
_FRAME = struct.Struct("!I")
SLOT_BUDGET = 64 * 1024 * 1024  # shared memory per worker (pages are only used once touched)


def default_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """`--workers` default: one front-end process per core, at most 8: past that the one inference
    process (and on CPUs the model's own threads) is the limit, not HTTP parsing and decoding."""
    return max(1, min(default_cores(), 8))


# --- framing --------------------------------------------------------------------------------------

def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    head = await reader.readexactly(_FRAME.size)
    return pickle.loads(await reader.readexactly(_FRAME.unpack(head)[0]))  # type: ignore[no-any-return]


# --- the model as workers see it ------------------------------------------------------------------

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


# --- the worker's side: the batcher that lives in another process ---------------------------------

@dataclass
class _Pending:
    future: asyncio.Future[np.ndarray]
    slot: int
    timing: RequestTiming


class RemoteBatcher:
    """`await infer(batch, timing)` in a worker; the DynamicBatcher of the inference process answers."""

    def __init__(self, path: str, index: int, runner: Runner, config: ServeConfig) -> None:
        self.path, self.index, self.runner = path, index, runner
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
        self._writer.write(_frame(("hello", self.index, os.getpid())))
        kind, shm_name, slots, in_bytes, out_bytes, ready, reason = await _read(self._reader)
        assert kind == "welcome"
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
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s + 10)
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
            return Stats.merged([self._state.stats.snapshot()])
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._stats_waiting[request_id] = future
        try:
            self._send(("stats", request_id))
            snapshot = await asyncio.wait_for(future, 10)
        except (TimeoutError, ServiceUnavailableError):
            return Stats.merged([self._state.stats.snapshot()])
        finally:
            self._stats_waiting.pop(request_id, None)
        stats = Stats.merged([snapshot])
        self.pending = stats.pending
        return stats

    async def _listen(self) -> None:
        assert self._reader is not None and self._writer is not None
        try:
            while True:
                message = await _read(self._reader)
                kind = message[0]
                if kind == "ok":
                    self._answer(*message[1:])
                elif kind == "error":
                    self._error(*message[1:])
                elif kind == "snapshot":
                    self._writer.write(_frame(("snapshot", message[1], self._state.stats.snapshot())))
                elif kind == "stats":
                    future = self._stats_waiting.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "ready":
                    self._set_ready(message[1], message[2])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        self.connected = False
        self._set_ready(False, "the inference process stopped")
        log.error("worker %d: lost the inference process; answering 503", self.index)
        self._fail_all("the inference process stopped; the server is not ready")

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


# --- the inference process -------------------------------------------------------------------------

@dataclass
class _Client:
    index: int
    pid: int
    writer: asyncio.StreamWriter
    shm: SharedMemory
    in_bytes: int
    slot_bytes: int
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class InferenceHub:
    """The inference process: one Runner, one DynamicBatcher, every worker's requests."""

    def __init__(self, runners: list[Runner], config: ServeConfig, control: Any, path: str,
                 workers: int) -> None:
        from .batcher import DynamicBatcher

        runner = runners[0]
        self.runner, self.config, self.control, self.path = runner, config, control, path
        self.expected = workers
        self.stats = Stats()
        self.batcher = DynamicBatcher(runner, self.stats, max_batch_size=config.max_batch_size,
                                      max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                                      timeout_s=config.timeout_s, instances=runners)
        self.clients: dict[int, _Client] = {}
        self.warm = False
        self.stopping = False
        self._snapshots: dict[int, dict[int, dict[str, Any]]] = {}
        self._snapshot_events: dict[int, asyncio.Event] = {}
        self._tokens = itertools.count()
        image = int(np.prod(runner.card.input_size)) * 4
        self.in_bytes = image * config.max_batch_size
        self.out_bytes = runner.card.num_classes * 4 * config.max_batch_size
        self.slots = max(4, min(64, SLOT_BUDGET // (self.in_bytes + self.out_bytes)))

    # readiness: warmed up, and every worker connected
    def _readiness(self) -> tuple[bool, str | None]:
        if self.stopping:
            return False, "draining"
        if not self.warm:
            return False, "warming up"
        if len(self.clients) < self.expected:
            return False, f"{len(self.clients)} of {self.expected} workers up"
        return True, None

    def _broadcast_ready(self) -> None:
        ready, reason = self._readiness()
        for client in self.clients.values():
            if not client.writer.is_closing():
                client.writer.write(_frame(("ready", ready, reason)))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_control() -> None:
            try:
                message = self.control.recv()
            except (EOFError, OSError):  # the parent is gone
                loop.remove_reader(self.control.fileno())
                stop.set()
                return
            if message[0] == "stop":
                stop.set()
            elif message[0] == "restarted":
                self.stats.worker_restarts += 1

        await self.batcher.start()
        try:
            card = self.runner.card
            if self.config.warmup:
                for instance in self.batcher.instances:
                    for size in sorted({1, max(1, self.config.max_batch_size)}):
                        batch = np.zeros((size, *card.input_size), dtype=np.float32)
                        await loop.run_in_executor(None, self.batcher.run_sync, batch, instance)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the reason the server stops
            self.control.send(("failed", f"warm-up failed: {exc}" if str(exc) else
                               f"warm-up failed: {type(exc).__name__}"))
            await self.batcher.stop()
            return
        server = await asyncio.start_unix_server(self._client, self.path)
        self.warm = True
        info = {"source": self.runner.source, "device": self.runner.device, "backend": self.runner.backend,
                "precision": self.runner.precision, "max_batch_size": self.runner.max_batch_size,
                "describe": _describe(self.runner)}
        self.control.send(("up", self.runner.card.to_json(), info))
        loop.add_reader(self.control.fileno(), on_control)
        await stop.wait()
        self.stopping = True
        self._broadcast_ready()
        server.close()
        tasks = [task for client in self.clients.values() for task in client.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
        await self.batcher.stop()
        for client in list(self.clients.values()):
            client.writer.close()
            _close_shm(client.shm)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, index, pid = await _read(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        shm = SharedMemory(create=True, size=self.slots * (self.in_bytes + self.out_bytes))
        client = _Client(index, pid, writer, shm, self.in_bytes, self.in_bytes + self.out_bytes)
        old = self.clients.get(index)
        self.clients[index] = client
        if old is not None:
            old.writer.close()
        self.stats.workers = len(self.clients)
        ready, reason = self._readiness()
        writer.write(_frame(("welcome", shm.name, self.slots, self.in_bytes, self.out_bytes, ready, reason)))
        self._broadcast_ready()
        log.info("worker %d (pid %d) connected", index, pid)
        try:
            while True:
                message = await _read(reader)
                if message[0] == "infer":
                    task = asyncio.create_task(self._infer(client, *message[1:]))
                    client.tasks.add(task)
                    task.add_done_callback(client.tasks.discard)
                elif message[0] == "stats":
                    asyncio.create_task(self._stats(client, message[1]))  # noqa: RUF006 - answers itself
                elif message[0] == "snapshot":
                    token, snapshot = message[1], message[2]
                    if token in self._snapshots:
                        self._snapshots[token][client.index] = snapshot
                        if len(self._snapshots[token]) >= len(self.clients):
                            self._snapshot_events[token].set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        if self.clients.get(index) is client:
            del self.clients[index]
        self.stats.workers = len(self.clients)
        self._broadcast_ready()
        if client.tasks:
            await asyncio.wait(list(client.tasks))
        writer.close()
        _close_shm(client.shm)

    async def _infer(self, client: _Client, request_id: int, slot: int, shape: tuple[int, ...],
                     inline: bytes | None) -> None:
        if slot >= 0:
            batch = np.ndarray(shape, np.float32, buffer=client.shm.buf, offset=slot * client.slot_bytes)
        else:
            assert inline is not None
            batch = np.frombuffer(inline, np.float32).reshape(shape)
        timing = RequestTiming()
        reply: tuple[Any, ...]
        try:
            logits = await self.batcher.infer(batch, timing)
        except QueueFullError as exc:
            reply = ("error", request_id, "full", 503, str(exc))
        except QueueTimeoutError as exc:
            reply = ("error", request_id, "timeout", 504, str(exc))
        except ToolkitError as exc:
            reply = ("error", request_id, "toolkit", exc.http_status, str(exc))
        except Exception as exc:  # noqa: BLE001 - the worker answers it as a backend failure
            reply = ("error", request_id, "backend", 500, f"{type(exc).__name__}: {exc}")
        else:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
            inline_out = None
            if slot >= 0 and logits.nbytes <= client.slot_bytes - client.in_bytes:
                offset = slot * client.slot_bytes + client.in_bytes
                np.ndarray(logits.shape, np.float32, buffer=client.shm.buf, offset=offset)[...] = logits
            else:
                inline_out = logits.tobytes()
            reply = ("ok", request_id, logits.shape, inline_out, timing.queue_s, timing.infer_s,
                     timing.batch_size)
        del batch
        if not client.writer.is_closing():
            client.writer.write(_frame(reply))

    async def _stats(self, client: _Client, request_id: int) -> None:
        token = next(self._tokens)
        self._snapshots[token], self._snapshot_events[token] = {}, asyncio.Event()
        for other in self.clients.values():
            if not other.writer.is_closing():
                other.writer.write(_frame(("snapshot", token)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._snapshot_events[token].wait(), 5)
        snapshots = list(self._snapshots.pop(token).values())
        del self._snapshot_events[token]
        self.stats.pending = self.batcher.pending
        merged = Stats.merged([self.stats.snapshot(), *snapshots])
        if not client.writer.is_closing():
            client.writer.write(_frame(("stats", request_id, merged.snapshot())))


def _attach(name: str, size: int) -> mmap.mmap:
    """Map the inference process's shared memory without registering it with a resource tracker (the
    creator unlinks it; a tracker in this process would unlink it again, or warn, at exit)."""
    with open(f"/dev/shm/{name}", "r+b") as handle:
        return mmap.mmap(handle.fileno(), size)


def _describe(runner: Runner) -> dict[str, Any]:
    try:
        return dict(runner.describe())
    except Exception:  # noqa: BLE001 - a description is optional
        return {}


def _close_shm(shm: SharedMemory) -> None:
    with contextlib.suppress(BufferError, FileNotFoundError, OSError):
        shm.close()
    with contextlib.suppress(FileNotFoundError, OSError):
        shm.unlink()


def _loop_factory() -> Any:
    """uvloop's event loop where installed (as uvicorn picks it), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


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


def _inference_main(spec: Any, config: ServeConfig, path: str, control: Any, workers: int,
                    level: str, instances: int = 1) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _logging(level)
    _name_process("toolkit-infer")
    with contextlib.ExitStack() as stack:
        try:
            runners = [stack.enter_context(spec.open()) for _ in range(max(1, instances))]
        except Exception as exc:  # noqa: BLE001 - the reason the server cannot start
            control.send(("failed", str(exc) or type(exc).__name__))
            return
        _run(InferenceHub(runners, config, control, path, workers).run(), _loop_factory())


def _listener(host: str, port: int, listen: bool) -> socket.socket:
    """A TCP socket on (host, port) in the port's SO_REUSEPORT group: the kernel spreads new connections
    over the listening members (a socket shared by all workers would let the first to wake take them all).

    proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and accepted
    sockets inherit the listening socket's proto (without it, Nagle adds ~40 ms per answer at c=1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(index: int, port: int, config: ServeConfig, path: str | None, card_json: str,
                 info: dict[str, Any], level: str, spec: Any = None) -> None:
    from .app import create_app
    from .server import DrainingServer, uvicorn_config

    _logging(level)
    _name_process(f"toolkit-worker{index}")
    parent = os.getppid()
    worker_config = config if index == 0 else replace(config, grpc_port=0)  # gRPC lives in worker 0
    model: Runner
    if path is None:  # the measured alternative: this worker runs its own model (CPU only)
        model = spec.open()
        app = create_app(model, worker_config)
    else:
        model = RemoteModel(ModelCard.from_json(card_json), info)
        app = create_app(model, worker_config, remote=RemoteBatcher(path, index, model, config))
    uv_config, state = uvicorn_config(model, worker_config, app=app, log_level=level)
    server = DrainingServer(uv_config, state)

    def orphaned() -> None:  # the parent was killed: nobody would ever stop this worker
        if os.getppid() != parent:
            server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = loop.call_later(1.0, lambda: None)

        def tick() -> None:
            nonlocal watch
            orphaned()
            watch = loop.call_later(1.0, tick)

        watch = loop.call_later(1.0, tick)
        try:
            await server.serve(sockets=[_listener(config.host, port, listen=True)])
        finally:
            watch.cancel()

    _run(main(), uv_config.get_loop_factory())


# --- the parent ------------------------------------------------------------------------------------

class Supervisor:
    """Starts the inference process and the workers, replaces dead workers, drains on SIGTERM."""

    def __init__(self, spec: Any, config: ServeConfig, workers: int, level: str = "info",
                 runner_per_worker: bool = False, instances: int = 1) -> None:
        self.spec, self.config, self.workers, self.level = spec, config, workers, level
        self.per_worker, self.instances = runner_per_worker, instances
        self.ctx = multiprocessing.get_context("spawn")
        self.stopping = False
        self.forced = False
        self.restarts = 0
        self.procs: dict[int, Any] = {}
        self.port = config.port

    def _bind(self) -> socket.socket:
        """Reserve the port (bound, never listening: it gets no connections) and learn it when 0 was asked;
        a port already taken fails here, before anything starts."""
        host = self.config.host
        try:
            sock = _listener(host, self.config.port, listen=False)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ServeStartupError(f"cannot listen on {host}:{self.config.port}: {reason}") from None
        self.port = sock.getsockname()[1]
        return sock

    def _start_worker(self, index: int, sock: socket.socket, card_json: str, info: dict[str, Any]) -> None:
        path, spec = (None, self.spec) if self.per_worker else (self.path, None)
        process = self.ctx.Process(target=_worker_main, name=f"toolkit-worker-{index}", daemon=False,
                                   args=(index, self.port, self.config, path, card_json, info, self.level,
                                         spec))
        process.start()
        self.procs[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)

    def _signal(self, signum: int, frame: Any) -> None:
        if self.stopping:
            self.forced = True
        self.stopping = True
        for process in self.procs.values():
            if process.is_alive() and process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL if self.forced else signal.SIGTERM)

    def run(self) -> None:
        _logging(self.level)
        sock = self._bind()
        folder = tempfile.mkdtemp(prefix="toolkit-serve-")
        self.path = os.path.join(folder, "inference.sock")
        control, child_control = self.ctx.Pipe()
        hub = self.ctx.Process(target=_inference_main, name="toolkit-inference", daemon=False,
                               args=(self.spec, self.config, self.path, child_control, self.workers,
                                     self.level, self.instances))
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            card_json, info = "", dict[str, Any]()
            if not self.per_worker:
                hub.start()
                log.info("inference process started (pid %d)", hub.pid)
                card_json, info = self._await_hub(hub, control)
            for index in range(self.workers):
                self._start_worker(index, sock, card_json, info)
            log.info("serving on http://%s:%d with %d workers", self.config.host, self.port, self.workers)
            self._supervise(hub, control, sock, card_json, info)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process in [*self.procs.values(), hub]:
                if process.pid is not None and process.is_alive():  # a second signal, or a failed start
                    process.kill()
                    process.join(5)
            sock.close()
            shutil.rmtree(folder, ignore_errors=True)

    def _await_hub(self, hub: Any, control: Any) -> tuple[str, dict[str, Any]]:
        while True:
            if self.stopping:
                raise ServeStartupError("stopped before the model was loaded")
            ready = multiprocessing.connection.wait([control, hub.sentinel], timeout=0.5)
            if control in ready:
                try:
                    message = control.recv()
                except EOFError:
                    message = ("failed", f"the inference process exited (code {hub.exitcode})")
                if message[0] == "up":
                    return message[1], message[2]
                raise ServeStartupError(f"cannot serve {self.config.name!r}: {message[1]}")
            if hub.sentinel in ready:
                hub.join()
                raise ServeStartupError(f"cannot serve {self.config.name!r}: the inference process exited "
                                        f"(code {hub.exitcode})")

    def _supervise(self, hub: Any, control: Any, sock: socket.socket, card_json: str,
                   info: dict[str, Any]) -> None:
        hub_alive = not self.per_worker
        deadline: float | None = None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.config.drain_timeout_s + 5
                log.info("draining %d workers", sum(p.is_alive() for p in self.procs.values()))
            alive = [p for p in self.procs.values() if p.is_alive()]
            if self.stopping and not alive:
                break
            if deadline is not None and time.monotonic() > deadline:
                for process in alive:
                    process.kill()
                break
            sentinels = [p.sentinel for p in alive] + ([hub.sentinel] if hub_alive else [])
            multiprocessing.connection.wait(sentinels, timeout=0.25)
            if hub_alive and not hub.is_alive():
                hub_alive = False
                log.error("the inference process (pid %d) died (exit code %s): the server is not ready and "
                          "answers inference with 503", hub.pid, hub.exitcode)
            if self.stopping:
                continue
            for index, process in list(self.procs.items()):
                if not process.is_alive():
                    process.join()
                    self.restarts += 1
                    log.error("worker %d (pid %d) died (exit code %s); starting a new one", index,
                              process.pid, process.exitcode)
                    if hub_alive:
                        with contextlib.suppress(OSError):
                            control.send(("restarted", index, process.pid, process.exitcode))
                    self._start_worker(index, sock, card_json, info)
        if hub_alive:
            with contextlib.suppress(OSError):
                control.send(("stop",))
            hub.join(self.config.drain_timeout_s + 5)


def model_instances(spec: Any, workers: int, asked: int | None = None) -> tuple[Any, int]:
    """(spec, copies of the model in the inference process). ONNX Runtime on CPU: one copy per worker by
    default, each with cores / copies intra-op threads (measured faster than one copy using every core
    for CIFAR-size models: small convolutions do not split well over threads). Anything else: one copy
    (GPUs: one batcher, one model, the biggest batches)."""
    onnx_cpu = (getattr(spec, "device", "cpu") == "cpu" and hasattr(spec, "backend_name")
                and spec.backend_name() == "onnxruntime")
    if not onnx_cpu:
        return spec, 1
    copies = max(1, asked or workers)
    if copies > 1 and "threads" not in spec.options:
        spec = replace(spec, options={**dict(spec.options), "threads": max(1, default_cores() // copies)})
    return spec, copies


def serve_workers(spec: Any, config: ServeConfig, workers: int, log_level: str = "info",
                  runner_per_worker: bool = False, instances: int | None = None) -> None:
    """Serve with `workers` front-end processes and one inference process opening `spec` (a
    `RunnerSpec` or any picklable object whose `open()` returns a Runner). Blocks until SIGTERM or
    SIGINT, then drains every worker. Raises ServeStartupError when the model cannot be served.

    `instances`: copies of the model behind the one batcher (`model_instances`). `runner_per_worker`
    is the alternative the bench measures on CPU: no inference process, each worker opens its own
    Runner (ONNX Runtime sized to cores / workers threads) and batches alone."""
    spec, copies = model_instances(spec, workers, instances)
    Supervisor(spec, config, workers, log_level, runner_per_worker, copies).run()
