"""Multi-process serving: front-end worker processes and one inference process, started and watched here.

    parent (supervisor)  reserves the ports, starts the processes, replaces dead workers, drains on SIGTERM
      |- inference process  model control; runs the shared models' batchers   (serve.inference)
      |- worker 0 .. N-1    uvicorn, each on its own SO_REUSEPORT socket on the port: HTTP parsing, limits,
                            API key, decoding and preprocessing, and with a model in every worker
                            (ONNX Runtime on CPU) its own runner; worker 0 also serves gRPC  (serve.remote)

Every port is reserved here before any process starts (serve.ports): a port in use is one line and exit
1, naming the flag that changes it. A worker that exits before it is up (connected and holding every
model) is a failed start: the server stops with its reason, never a restart loop. A worker that dies
later is replaced after a back-off (0.5 s, doubling up to 8 s); more than `MAX_RESTARTS` deaths within
`RESTART_WINDOW_S` stop the server with the reason. Connections a dead worker had accepted but not
answered are lost with it, and so is its share of the counters. If the inference process dies the
server turns not-ready and every inference request gets 503 at once (restart the server).

This module is the parent (`Supervisor`, `serve_workers`) and the worker processes' entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from toolkit.errors import UsageError

from . import ports
from .config import ServeConfig
from .errors import ServeStartupError
from .inference import inference_main, placement
from .ipc import (
    HubFailed,
    HubUp,
    Serving,
    StartFailed,
    Stop,
    WorkerRestarted,
    WorkerUp,
    default_cores,
    name_process,
    run,
    setup_logging,
)
from .remote import HubLink
from .repository import FileModels, GivenRunner, ModelSource, as_source

log = logging.getLogger("toolkit.serve")
MAX_RESTARTS = 5  # deaths of running workers within RESTART_WINDOW_S that stop the server
RESTART_WINDOW_S = 60.0
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0


def default_workers() -> int:
    """`--workers` default: one front-end process per core, at most 8: past that the one inference
    process (and on CPUs the model's own threads) is the limit, not HTTP parsing and decoding."""
    return max(1, min(default_cores(), 8))


def _worker_main(index: int, config: ServeConfig, path: str, level: str, report: Any) -> None:
    from .app import create_app
    from .server import DrainingServer, uvicorn_config

    setup_logging(level)
    name_process(f"toolkit-worker{index}")
    parent = os.getppid()
    worker_config = config if index == 0 else replace(config, grpc_port=0)  # gRPC lives in worker 0
    app = create_app(None, worker_config, link=HubLink(path, index, config))
    uv_config, state = uvicorn_config(None, worker_config, app=app, log_level=level)
    server = DrainingServer(uv_config, state, interruptible=False)  # the parent drains it on SIGTERM

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def watch() -> None:  # the parent was killed: nobody would ever stop this worker
            if os.getppid() != parent:
                server.should_exit = True
            handle[0] = loop.call_later(1.0, watch)

        handle = [loop.call_later(1.0, watch)]
        try:
            await server.serve(sockets=[ports.listener(config.host, config.port, listen=True)])
        finally:
            handle[0].cancel()

    try:
        run(main(), uv_config.get_loop_factory())
    except Exception as exc:  # noqa: BLE001 - the reason this worker could not run, for the parent
        state.fatal = state.fatal or f"{type(exc).__name__}: {exc}"
    if state.fatal:
        with contextlib.suppress(OSError):
            report.send(StartFailed(state.fatal))
        raise SystemExit(1)


@dataclass
class _Worker:
    process: Any
    report: Any  # the parent's end of the worker's StartFailed pipe
    up: bool = False


@dataclass
class _Restarts:
    """Deaths of running workers: the back-off before the next replacement, and when to give up."""

    deaths: list[float] = field(default_factory=list)

    def record(self, now: float) -> float | None:
        """The delay before replacing a worker that died now; None: too many deaths, stop the server."""
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(self.deaths) > MAX_RESTARTS:
            return None
        return min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (len(self.deaths) - 1))


class Supervisor:
    """Reserves the ports, starts the inference process and the workers, replaces dead workers, drains."""

    def __init__(self, source: ModelSource, config: ServeConfig, workers: int, level: str = "info",
                 runner_per_worker: bool | None = None) -> None:
        self.source, self.config, self.count, self.level = source, config, workers, level
        self.per_worker = runner_per_worker
        self.ctx = multiprocessing.get_context("spawn")
        self.stopping = self.forced = False
        self.workers: dict[int, _Worker] = {}
        self.due: dict[int, float] = {}  # index -> when its replacement starts
        self.restarts = _Restarts()

    def _signal(self, signum: int, frame: Any) -> None:
        self.forced, self.stopping = self.stopping, True
        for worker in self.workers.values():
            if worker.process.is_alive() and worker.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGKILL if self.forced else signal.SIGTERM)

    def run(self) -> None:
        setup_logging(self.level)
        held = [ports.reserve(self.config.host, self.config.port, "", ports.HTTP_HINT)]
        if self.config.grpc_port:
            held.append(ports.reserve(self.config.host, self.config.grpc_port, ports.GRPC, ports.GRPC_HINT))
        self.config = replace(self.config, port=held[0].getsockname()[1], reserved_ports=True)
        folder = tempfile.mkdtemp(prefix="toolkit-serve-")
        path = os.path.join(folder, "inference.sock")
        pipe, hub_end = self.ctx.Pipe()
        hub = self.ctx.Process(target=inference_main, name="toolkit-inference", daemon=False, args=(
            self.source, self.config, path, hub_end, self.count, self.level, self.per_worker))
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            hub.start()
            log.info("inference process started (pid %d)", hub.pid)
            self._await_hub(hub, pipe)
            for index in range(self.count):
                self._start_worker(index, path)
            log.info("serving on http://%s:%d with %d workers", self.config.host, self.config.port,
                     self.count)
            self._supervise(hub, pipe, path)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process in [*(w.process for w in self.workers.values()), hub]:
                if process.pid is not None and process.is_alive():  # a second signal, or a failed start
                    process.kill()
                    process.join(5)
            for sock in held:
                sock.close()
            shutil.rmtree(folder, ignore_errors=True)

    def _start_worker(self, index: int, path: str) -> None:
        report, worker_end = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=_worker_main, name=f"toolkit-worker-{index}", daemon=False,
                                   args=(index, self.config, path, self.level, worker_end))
        process.start()
        worker_end.close()
        self.workers[index] = _Worker(process, report)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _await_hub(self, hub: Any, pipe: Any) -> None:
        while not self.stopping:
            ready = multiprocessing.connection.wait([pipe, hub.sentinel], timeout=0.5)
            if pipe in ready:
                with contextlib.suppress(EOFError):
                    message = pipe.recv()
                    if isinstance(message, HubUp):
                        return
                    if isinstance(message, HubFailed):
                        raise ServeStartupError(f"cannot serve: {message.reason}")
            if hub.sentinel in ready:
                hub.join()
                raise ServeStartupError(f"cannot serve: the inference process exited (code {hub.exitcode})")
        raise ServeStartupError("stopped before the server started")

    def _supervise(self, hub: Any, pipe: Any, path: str) -> None:
        hub_alive, deadline = True, None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.config.drain_timeout_s + 5
                log.info("draining %d workers", sum(w.process.is_alive() for w in self.workers.values()))
            alive = [w.process for w in self.workers.values() if w.process.is_alive()]
            if self.stopping and not alive:
                break
            if deadline is not None and time.monotonic() > deadline:
                for process in alive:
                    process.kill()
                break
            waits = [p.sentinel for p in alive] + ([hub.sentinel, pipe] if hub_alive else [])
            ready = multiprocessing.connection.wait(waits, timeout=0.25)
            if hub_alive and pipe in ready:
                self._from_hub(pipe)
            if hub_alive and not hub.is_alive():
                hub_alive = False
                log.error("the inference process (pid %d) died (exit code %s): the server is not ready and "
                          "answers inference with 503", hub.pid, hub.exitcode)
            if not self.stopping:
                self._replace_dead(pipe if hub_alive else None, path)
        if hub_alive:
            with contextlib.suppress(OSError):
                pipe.send(Stop())
            hub.join(self.config.drain_timeout_s + 5)

    def _from_hub(self, pipe: Any) -> None:
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            return
        match message:
            case WorkerUp(index=index, pid=pid):
                worker = self.workers.get(index)
                if worker is not None and worker.process.pid == pid:
                    worker.up = True
            case Serving():
                log.info("ready: every worker is up and every model that should be loaded is")
            case HubFailed(reason=reason):
                raise ServeStartupError(f"cannot serve: {reason}")

    def _replace_dead(self, pipe: Any, path: str) -> None:
        now = time.monotonic()
        for index, worker in list(self.workers.items()):
            if index in self.due:
                if now >= self.due[index]:
                    del self.due[index]
                    self._start_worker(index, path)
                continue
            process = worker.process
            if process.is_alive():
                continue
            process.join()
            if not worker.up:  # it never held its models: a failed start, whatever the reason
                raise ServeStartupError(f"cannot serve: worker {index} {self._why(worker)}")
            delay = self.restarts.record(now)
            if delay is None:
                deaths = len(self.restarts.deaths)
                raise ServeStartupError(f"stopped: workers died {deaths} times within {RESTART_WINDOW_S:g} s "
                                        f"(the last: worker {index}, exit code {process.exitcode})")
            log.error("worker %d (pid %d) died (exit code %s); starting a new one in %.1f s", index,
                      process.pid, process.exitcode, delay)
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.send(WorkerRestarted(index, process.pid, process.exitcode))
            self.due[index] = now + delay

    @staticmethod
    def _why(worker: _Worker) -> str:
        with contextlib.suppress(EOFError, OSError):
            if worker.report.poll():
                message = worker.report.recv()
                if isinstance(message, StartFailed):
                    return f"could not start: {message.reason}"
        return f"exited (code {worker.process.exitcode}) before it was up; see its log"


def serve_workers(models: Any, config: ServeConfig, workers: int, log_level: str = "info",
                  runner_per_worker: bool | None = None, instances: int | None = None) -> None:
    """Serve with `workers` front-end processes and one inference process. `models`: a ModelSource
    (serve.repository), or one opener (a `RunnerSpec` or any picklable object whose `open()` returns a
    Runner) served as `config.name`. Blocks until SIGTERM or SIGINT, then drains every worker. Raises
    ServeStartupError when a port is in use or a model that must load cannot be served.

    `runner_per_worker`: each worker opens its own Runner and batches its own requests (None: ONNX
    Runtime on CPU, see `placement`). `instances`: otherwise, copies of the model behind the one batcher."""
    source = as_source(models, config, instances)
    if isinstance(source, GivenRunner):
        raise UsageError("an opened Runner is served in one process; give worker processes an opener")
    if isinstance(source, FileModels):  # refused before anything starts: a model per worker on a GPU...
        for opener in source.models.values():
            placement(opener, workers, instances, runner_per_worker)
    Supervisor(source, config, workers, log_level, runner_per_worker).run()
