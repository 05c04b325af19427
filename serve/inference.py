"""The inference process of multi-process serving: it controls the models and runs the shared ones.

`InferenceHub` accepts every worker on a Unix socket and holds the server's `ModelControl`
(serve.control) with a `HubFleet`: a model version is placed (`placement`) either in every worker (each
opens its own copy; the CPU default for ONNX Runtime) or here (one DynamicBatcher over `copies` of it
that every worker feeds through a shared-memory block per worker, so their requests meet in one runner
call: what GPUs use). Either way a version is routed only once every worker holds it, and freed only
once every worker's requests to it finished. The hub decides readiness (every model that should be
loaded is, and every worker is up), merges the statistics for `/metrics` and the v2 API, carries model
control and system shared-memory registrations from the worker that was asked to all the others, and
replays all of it to a worker that starts later.
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

from toolkit.errors import UsageError

from .config import ServeConfig
from .control import ModelControl, open_served
from .errors import ModelLoadError, ServeStartupError
from .ipc import (
    SLOT_BUDGET,
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
    HubFailed,
    HubUp,
    Infer,
    Inferred,
    Publish,
    Readiness,
    Refused,
    RegionCommand,
    Regions,
    Serving,
    Slots,
    SnapshotQuery,
    StatsQuery,
    Stop,
    Welcome,
    WorkerRestarted,
    WorkerUp,
    close_shm,
    default_cores,
    loop_factory,
    name_process,
    receive,
    run,
    send,
    setup_logging,
)
from .metrics import RequestTiming, ServerCounters, Stats
from .models import IndexEntry, ModelDescription, ServedModel
from .repository import ModelSource, VersionSpec

log = logging.getLogger("toolkit.serve")


@dataclass(frozen=True)
class _Block:
    """One worker's shared-memory slots for one model run here."""

    shm: SharedMemory
    slots: Slots

    @property
    def slot_bytes(self) -> int:
        return self.slots.in_bytes + self.slots.out_bytes


@dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    writer: asyncio.StreamWriter
    up: bool = False  # holds every model: its start succeeded
    blocks: dict[int, _Block] = field(default_factory=dict)  # uid -> its slots for a model run here
    waiting: dict[int, asyncio.Future[Any]] = field(default_factory=dict)  # token -> Attached/Detached/...
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class InferenceHub:
    """The inference process: model control, the shared models' batchers, every worker's link."""

    def __init__(self, source: ModelSource, config: ServeConfig, pipe: Any, path: str, workers: int,
                 per_worker: bool | None) -> None:
        self.config, self.pipe, self.path, self.expected = config, pipe, path, workers
        self.per_worker = per_worker
        self.workers: dict[int, _Worker] = {}
        self.local: dict[int, ServedModel] = {}  # uid -> a model run here
        self.attachments: dict[int, Attach] = {}  # uid -> how every worker holds it (replayed to new ones)
        self.published = Publish((), {})
        self.regions: dict[str, RegionCommand] = {}
        self.counters = ServerCounters()
        self.control = ModelControl(source, HubFleet(self), mode=config.model_control,
                                    startup=config.load_models, on_change=self.broadcast_readiness)
        self.all_connected = asyncio.Event()
        self.stopping = False
        self.announced = False
        self._tokens = itertools.count()
        self._snapshots: dict[int, tuple[dict[int, Counters], asyncio.Event, int]] = {}

    # --- readiness -----------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str | None]:
        if self.stopping:
            return False, "draining"
        up = sum(w.up for w in self.workers.values())
        if up < self.expected:
            return False, f"{up} of {self.expected} workers up"
        return self.control.readiness()

    def broadcast_readiness(self) -> None:
        ready, reason = self.readiness()
        if ready and not self.announced:  # a worker that dies before this is a failed start
            self.announced = True
            with contextlib.suppress(OSError):
                self.pipe.send(Serving())
        for worker in self.workers.values():
            send(worker.writer, Readiness(ready, reason))

    # --- the process ---------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        server = await asyncio.start_unix_server(self._connected, self.path)
        loop.add_reader(self.pipe.fileno(), self._from_parent, loop, stop)
        self.pipe.send(HubUp())
        try:
            await self.control.start()
        except ServeStartupError as exc:
            self.pipe.send(HubFailed(str(exc)))
            stop.set()
        self.broadcast_readiness()
        await stop.wait()
        self.stopping = True
        self.broadcast_readiness()
        server.close()
        tasks = [task for worker in self.workers.values() for task in worker.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
        for model in list(self.local.values()):  # before the shared memory its batches are views of goes
            await model.close(0)
        for worker in list(self.workers.values()):
            worker.writer.close()
            for block in worker.blocks.values():
                close_shm(block.shm)

    def _from_parent(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(self.pipe.fileno())
            stop.set()
            return
        match message:
            case Stop():
                stop.set()
            case WorkerRestarted():
                self.counters.worker_restarts += 1

    # --- one worker ---------------------------------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await receive(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        assert isinstance(hello, Hello)
        worker = _Worker(hello.index, hello.pid, writer)
        old = self.workers.get(worker.index)
        self.workers[worker.index] = worker
        if old is not None:
            old.writer.close()
        self.counters.workers = len(self.workers)
        send(writer, Welcome(tuple(self.regions.values())))
        log.info("worker %d (pid %d) connected", worker.index, worker.pid)
        catch_up = asyncio.create_task(self._catch_up(worker))
        # the loop ends when the worker closes its end (it exited, or was killed): then clean up below
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                self._dispatch(worker, await receive(reader))
        catch_up.cancel()
        await self._gone(worker)

    async def _catch_up(self, worker: _Worker) -> None:
        """A worker that connects holds every loaded model before it counts as up."""
        if len(self.workers) >= self.expected:
            self.all_connected.set()
        try:
            for attach in list(self.attachments.values()):
                await self._attach(worker, attach)
        except ModelLoadError as exc:
            log.error("worker %d cannot hold the loaded models (%s); it is not up", worker.index, exc)
            return
        send(worker.writer, self.published)
        worker.up = True
        with contextlib.suppress(OSError):
            self.pipe.send(WorkerUp(worker.index, worker.pid))
        self.broadcast_readiness()

    async def _gone(self, worker: _Worker) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.counters.workers = len(self.workers)
        for future in worker.waiting.values():
            if not future.done():
                future.set_exception(ModelLoadError(f"worker {worker.index} exited"))
        self.broadcast_readiness()
        if worker.tasks:
            await asyncio.wait(list(worker.tasks))
        worker.writer.close()
        for block in worker.blocks.values():
            close_shm(block.shm)

    def _dispatch(self, worker: _Worker, message: object) -> None:
        match message:
            case Infer():
                self._spawn(worker, self._infer(worker, message))
            case Attached(token=token) | Detached(token=token) | Applied(request_id=token):
                future = worker.waiting.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(message)
            case StatsQuery(request_id=request_id):
                self._spawn(worker, self._stats(worker, request_id))
            case Counters(request_id=token) if token in self._snapshots:
                answers, complete, expected = self._snapshots[token]
                answers[worker.index] = message
                if len(answers) >= expected:
                    complete.set()
            case Control():
                self._spawn(worker, self._control(worker, message))
            case Regions():
                self._spawn(worker, self._regions(worker, message))
            case _:
                log.error("unexpected message %r from worker %d", type(message).__name__, worker.index)

    def _spawn(self, worker: _Worker, work: Any) -> None:
        task = asyncio.create_task(work)
        worker.tasks.add(task)
        task.add_done_callback(worker.tasks.discard)

    async def ask(self, worker: _Worker, make: Any) -> Any:
        """Send `make(token)` to one worker and await its answer (a worker that exits fails it)."""
        token = next(self._tokens)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.waiting[token] = future
        send(worker.writer, make(token))
        return await future

    # --- models in the workers --------------------------------------------------------------------------

    async def _attach(self, worker: _Worker, attach: Attach) -> ModelDescription:
        slots = None
        local = self.local.get(attach.uid)
        if local is not None:  # the model runs here: the worker writes its batches into a block of its own
            held = worker.blocks.get(attach.uid)
            slots = held.slots if held is not None else self._block(worker, attach.uid, local)
        answer: Attached = await self.ask(worker, lambda token: replace(attach, token=token, slots=slots))
        if answer.failure is not None:  # the worker logged which it was; every worker fails alike
            raise ModelLoadError(answer.failure.message)
        return answer.description  # type: ignore[no-any-return]

    def _block(self, worker: _Worker, uid: int, model: ServedModel) -> Slots:
        """Slots for the largest batch a request to `model` may carry (larger ones travel inline)."""
        limit = max(1, model.settings.max_batch_size)
        in_bytes = int(np.prod(model.card.input_size)) * 4 * limit
        out_bytes = model.card.num_classes * 4 * limit
        count = max(4, min(64, SLOT_BUDGET // (in_bytes + out_bytes)))
        shm = SharedMemory(create=True, size=count * (in_bytes + out_bytes))
        slots = Slots(shm.name, count, in_bytes, out_bytes)
        worker.blocks[uid] = _Block(shm, slots)
        return slots

    async def attach_everywhere(self, attach: Attach) -> ModelDescription:
        self.attachments[attach.uid] = attach
        workers = list(self.workers.values())
        answers = await asyncio.gather(*(self._attach(w, attach) for w in workers), return_exceptions=True)
        failures = [a for a in answers if isinstance(a, BaseException)]
        if failures:
            raise failures[0]
        return answers[0]  # type: ignore[return-value]

    async def detach_everywhere(self, uid: int) -> None:
        self.attachments.pop(uid, None)
        workers = list(self.workers.values())
        await asyncio.gather(*(self.ask(w, lambda token: Detach(token, uid)) for w in workers),
                             return_exceptions=True)
        for worker in workers:
            block = worker.blocks.pop(uid, None)
            if block is not None:
                close_shm(block.shm)

    def publish(self, entries: tuple[IndexEntry, ...], routes: dict[str, dict[str, int]]) -> None:
        self.published = Publish(entries, routes)
        for worker in self.workers.values():
            if worker.up:
                send(worker.writer, self.published)

    # --- what workers ask -----------------------------------------------------------------------------------

    async def _infer(self, worker: _Worker, order: Infer) -> None:
        """Feed a view of the worker's slot to the model's batcher, and write the logits back into it."""
        model, block = self.local.get(order.uid), worker.blocks.get(order.uid)
        if model is None or (block is None and order.slot >= 0):
            failure = Failure(503, "ServiceUnavailableError", "the model was unloaded")
            send(worker.writer, Refused(order.request_id, failure))
            return
        timing = RequestTiming()
        if order.slot >= 0:
            assert block is not None
            offset = order.slot * block.slot_bytes
            batch = np.ndarray(order.shape, np.float32, buffer=block.shm.buf, offset=offset)
        else:
            assert order.inline is not None
            batch = np.frombuffer(order.inline, np.float32).reshape(order.shape)
        try:
            logits = np.ascontiguousarray(await model.batcher.infer(batch, timing), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - the worker raises it again as the same error
            send(worker.writer, Refused(order.request_id, Failure.of(exc)))
            return
        finally:
            del batch
        inline = None
        if block is not None and order.slot >= 0 and logits.nbytes <= block.slots.out_bytes:
            offset = order.slot * block.slot_bytes + block.slots.in_bytes
            np.ndarray(logits.shape, np.float32, buffer=block.shm.buf, offset=offset)[...] = logits
        else:
            inline = logits.tobytes()
        send(worker.writer, Inferred(order.request_id, logits.shape, inline, timing.queue_s, timing.infer_s,
                                     timing.batch_size))

    async def _control(self, worker: _Worker, order: Control) -> None:
        try:
            await (self.control.load if order.action == "load" else self.control.unload)(order.name)
        except Exception as exc:  # noqa: BLE001 - answered to the worker that was asked
            send(worker.writer, Refused(order.request_id, Failure.of(exc)))
            return
        send(worker.writer, Done(order.request_id))

    async def _regions(self, origin: _Worker, order: Regions) -> None:
        """One worker registered or unregistered a region: every other one does the same before the client
        hears back, so its next request may reach any worker."""
        command = order.command
        if command.key is not None:
            self.regions[str(command.name)] = command
        elif command.name is None:
            self.regions.clear()
        else:
            self.regions.pop(command.name, None)
        others = [w for w in self.workers.values() if w is not origin]
        await asyncio.gather(*(self.ask(w, lambda token: Regions(token, command)) for w in others),
                             return_exceptions=True)
        send(origin.writer, Done(order.request_id))

    async def _stats(self, worker: _Worker, request_id: int) -> None:
        """Every worker's counters (asked now) merged with the models run here, for the one who asked."""
        token, workers = next(self._tokens), list(self.workers.values())
        answers: dict[int, Counters] = {}
        complete = asyncio.Event()
        self._snapshots[token] = (answers, complete, len(workers))
        for each in workers:
            send(each.writer, SnapshotQuery(token))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # a worker that does not answer is left out
                await complete.wait()
        del self._snapshots[token]
        send(worker.writer, self._merged(request_id, list(answers.values())))

    def _merged(self, request_id: int, answers: list[Counters]) -> Counters:
        for model in self.local.values():
            model.stats.pending = model.batcher.pending
        models: dict[int, list[dict[str, Any]]] = {uid: [m.stats.snapshot()] for uid, m in self.local.items()}
        for answer in answers:
            for uid, snapshot in answer.models.items():
                models.setdefault(uid, []).append(snapshot)
        server = ServerCounters.merged([self.counters.snapshot(), *(a.server for a in answers)])
        return Counters(request_id, {uid: Stats.merged(s).snapshot() for uid, s in models.items()},
                        server.snapshot())


class HubFleet:
    """serve.control's Fleet across processes: a version is brought up in every worker (and here when it
    is shared) before it is routed, and taken down everywhere after its requests finished."""

    def __init__(self, hub: InferenceHub) -> None:
        self.hub = hub

    async def bring_up(self, spec: VersionSpec, uid: int) -> ModelDescription:
        hub = self.hub
        # with a model in every worker, the workers are its instances (--model-instances is refused there)
        instances = None if hub.per_worker else spec.settings.instances
        opener, copies, per_worker = placement(spec.opener, hub.expected, instances, hub.per_worker)
        await hub.all_connected.wait()
        attach = Attach(-1, uid, spec.name, spec.version, spec.settings)
        if per_worker:
            attach = replace(attach, spec=opener)
        else:
            model = await open_served(replace(spec, opener=opener), uid, copies=copies,
                                      warmup=hub.config.warmup)
            hub.local[uid] = model
            attach = replace(attach, description=model.description)
        try:
            return await hub.attach_everywhere(attach)
        except BaseException:
            await self.take_down(uid)
            raise

    async def take_down(self, uid: int) -> None:
        await self.hub.detach_everywhere(uid)
        model = self.hub.local.pop(uid, None)
        if model is not None:
            await model.close(self.hub.config.drain_timeout_s)

    def publish(self, entries: Any, routes: dict[str, dict[str, int]]) -> None:
        self.hub.publish(tuple(entries), routes)


def inference_main(source: ModelSource, config: ServeConfig, path: str, pipe: Any, workers: int,
                   level: str, per_worker: bool | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(level)
    name_process("toolkit-infer")

    async def main() -> None:
        await InferenceHub(source, config, pipe, path, workers, per_worker).run()

    run(main(), loop_factory())


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
