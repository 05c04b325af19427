"""The inference process of multi-process serving: one Runner (or `instances` copies), one DynamicBatcher.

`InferenceHub` accepts every worker on the Unix socket, gives each a shared-memory block, feeds views of
its slots to the batcher so requests from every worker meet in one runner call, and writes the logits
back. It decides readiness (warmed up, every worker connected) and tells the workers when it changes;
`/metrics` and the v2 statistics are gathered here: this process's runner calls merged with each
worker's snapshot of its requests.

With a model in every worker (`serve_workers(..., runner_per_worker=True)`, the CPU default for ONNX
Runtime) this process opens no model: it only decides readiness (every worker connected and warmed
up) and gathers the statistics, so the server promises the same in both arrangements.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
from dataclasses import dataclass, field, replace
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError, UsageError
from toolkit.runtime.base import Runner

from .config import ServeConfig
from .errors import QueueFullError, QueueTimeoutError
from .ipc import SLOT_BUDGET, _close_shm, _frame, _logging, _name_process, _read, _run, default_cores
from .metrics import RequestTiming, Stats

log = logging.getLogger("toolkit.serve")


@dataclass
class _Client:
    index: int
    pid: int
    writer: asyncio.StreamWriter
    shm: SharedMemory | None  # None: the worker runs its own model
    in_bytes: int
    slot_bytes: int
    warm: bool  # its model warmed up (always, when it shares this process's model)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class InferenceHub:
    """The inference process: one Runner, one DynamicBatcher, every worker's requests. Without
    runners: the coordinator of workers that run their own models (readiness and statistics only)."""

    def __init__(self, runners: list[Runner], config: ServeConfig, control: Any, path: str,
                 workers: int) -> None:
        from .batcher import DynamicBatcher

        self.config, self.control, self.path = config, control, path
        self.expected = workers
        self.stats = Stats()
        self.batcher: DynamicBatcher | None = None
        self.in_bytes = self.out_bytes = self.slots = 0
        if runners:
            runner = self.runner = runners[0]
            self.batcher = DynamicBatcher(runner, self.stats, max_batch_size=config.max_batch_size,
                                          max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                                          timeout_s=config.timeout_s, instances=runners)
            self.in_bytes = int(np.prod(runner.card.input_size)) * 4 * config.max_batch_size
            self.out_bytes = runner.card.num_classes * 4 * config.max_batch_size
            self.slots = max(4, min(64, SLOT_BUDGET // (self.in_bytes + self.out_bytes)))
        self.clients: dict[int, _Client] = {}
        self.warm = False
        self.stopping = False
        self.announced = False  # the parent was told the server is ready, once
        self._snapshots: dict[int, dict[int, dict[str, Any]]] = {}
        self._snapshot_events: dict[int, asyncio.Event] = {}
        self._tokens = itertools.count()

    # readiness: warmed up, and every worker connected
    def _readiness(self) -> tuple[bool, str | None]:
        if self.stopping:
            return False, "draining"
        if not self.warm:
            return False, "warming up"
        if len(self.clients) < self.expected:
            return False, f"{len(self.clients)} of {self.expected} workers up"
        cold = sum(not client.warm for client in self.clients.values())
        if cold:
            return False, f"{cold} of {self.expected} workers warming up"
        return True, None

    def _broadcast_ready(self) -> None:
        ready, reason = self._readiness()
        if ready and not self.announced:  # a worker that dies before this is a failed start
            self.announced = True
            with contextlib.suppress(OSError):
                self.control.send(("serving",))
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

        batcher = self.batcher
        if batcher is None:
            await self._serve(loop, stop, on_control, "", {})
            return
        await batcher.start()
        try:
            card = self.runner.card
            if self.config.warmup:
                for instance in batcher.instances:
                    for size in sorted({1, max(1, self.config.max_batch_size)}):
                        batch = np.zeros((size, *card.input_size), dtype=np.float32)
                        await loop.run_in_executor(None, batcher.run_sync, batch, instance)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the reason the server stops
            self.control.send(("failed", f"warm-up failed: {exc}" if str(exc) else
                               f"warm-up failed: {type(exc).__name__}"))
            await batcher.stop()
            return
        info = {"source": self.runner.source, "device": self.runner.device, "backend": self.runner.backend,
                "precision": self.runner.precision, "max_batch_size": self.runner.max_batch_size,
                "describe": _describe(self.runner)}
        await self._serve(loop, stop, on_control, self.runner.card.to_json(), info)

    async def _serve(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, on_control: Any,
                     card_json: str, info: dict[str, Any]) -> None:
        """Accept the workers until the parent says stop, then let their requests finish."""
        server = await asyncio.start_unix_server(self._client, self.path)
        self.warm = True
        self.control.send(("up", card_json, info))
        loop.add_reader(self.control.fileno(), on_control)
        await stop.wait()
        self.stopping = True
        self._broadcast_ready()
        server.close()
        tasks = [task for client in self.clients.values() for task in client.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
        if self.batcher is not None:  # before the shared memory its batches are views of goes away
            await self.batcher.stop()
        for client in list(self.clients.values()):
            client.writer.close()
            _close_shm(client.shm)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, index, pid, shares_model = await _read(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        shm = None
        if shares_model and self.batcher is not None:
            shm = SharedMemory(create=True, size=self.slots * (self.in_bytes + self.out_bytes))
        client = _Client(index, pid, writer, shm, self.in_bytes, self.in_bytes + self.out_bytes,
                         warm=shm is not None)
        old = self.clients.get(index)
        self.clients[index] = client
        if old is not None:
            old.writer.close()
        self.stats.workers = len(self.clients)
        ready, reason = self._readiness()
        writer.write(_frame(("welcome", None if shm is None else shm.name, self.slots, self.in_bytes,
                             self.out_bytes, ready, reason)))
        self._broadcast_ready()
        log.info("worker %d (pid %d) connected", index, pid)
        # the loop ends when the worker closes its end (it exited, or was killed): then clean up below
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                message = await _read(reader)
                if message[0] == "infer":
                    task = asyncio.create_task(self._infer(client, *message[1:]))
                    client.tasks.add(task)
                    task.add_done_callback(client.tasks.discard)
                elif message[0] == "warm":
                    client.warm = True
                    self._broadcast_ready()
                elif message[0] == "stats":
                    asyncio.create_task(self._stats(client, message[1]))  # noqa: RUF006 - answers itself
                elif message[0] == "snapshot":
                    token, snapshot = message[1], message[2]
                    if token in self._snapshots:
                        self._snapshots[token][client.index] = snapshot
                        if len(self._snapshots[token]) >= len(self.clients):
                            self._snapshot_events[token].set()
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
        assert self.batcher is not None and client.shm is not None  # only workers sharing the model infer
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
        self.stats.pending = 0 if self.batcher is None else self.batcher.pending
        merged = Stats.merged([self.stats.snapshot(), *snapshots])
        if not client.writer.is_closing():
            client.writer.write(_frame(("stats", request_id, merged.snapshot())))



def _describe(runner: Runner) -> dict[str, Any]:
    try:
        return dict(runner.describe())
    except Exception:  # noqa: BLE001 - a description is optional
        return {}


def _loop_factory() -> Any:
    """uvloop's event loop where installed (as uvicorn picks it), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


def _inference_main(spec: Any, config: ServeConfig, path: str, control: Any, workers: int,
                    level: str, instances: int = 1) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _logging(level)
    _name_process("toolkit-infer")
    with contextlib.ExitStack() as stack:
        try:
            runners = [stack.enter_context(spec.open()) for _ in range(instances)]  # 0: workers run models
        except Exception as exc:  # noqa: BLE001 - the reason the server cannot start
            control.send(("failed", str(exc) or type(exc).__name__))
            return
        _run(InferenceHub(runners, config, control, path, workers).run(), _loop_factory())


def placement(spec: Any, workers: int, instances: int | None = None,
              per_worker: bool | None = None) -> tuple[Any, int, bool]:
    """Where the model runs: (spec, copies in the inference process, a model in every worker).

    ONNX Runtime on CPU: by default a model in every worker, each with cores / workers intra-op threads
    (bench/bench_serve.py: ~1.1x the throughput of one shared inference process on 2 cores, the
    hand-off between processes costing more than batching across workers gains on a CPU); asked to
    share, one copy per worker behind the one batcher (small convolutions do not split well over
    threads). Anything else shares one copy (GPUs: one batcher, one model, the biggest batches; torch
    and OpenVINO on CPU size their own threads to the whole machine). Refuses what cannot be placed:
    a model per worker on a GPU, or model instances with a model per worker."""
    on_cpu = getattr(spec, "device", "cpu") == "cpu"
    if per_worker and not on_cpu:
        raise UsageError("--runner-per-worker is for CPUs; a GPU is shared through one inference process")
    if per_worker and instances is not None:
        raise UsageError("--model-instances applies to --shared-runner (with --runner-per-worker every "
                         "worker has one model)")
    onnx_cpu = on_cpu and hasattr(spec, "backend_name") and spec.backend_name() == "onnxruntime"
    per_worker = onnx_cpu if per_worker is None else per_worker
    copies = 0 if per_worker else max(1, instances or workers) if onnx_cpu else 1
    sharing = max(1, workers if per_worker else copies)
    if onnx_cpu and sharing > 1 and "threads" not in spec.options:
        spec = replace(spec, options={**dict(spec.options), "threads": max(1, default_cores() // sharing)})
    return spec, copies, per_worker
