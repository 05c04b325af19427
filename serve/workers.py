"""Multi-process serving: front-end worker processes feeding one inference process through shared memory.

    parent (supervisor)  binds the port, starts the processes, restarts dead workers, drains on SIGTERM
      |- inference process  opens the Runner, warms it up, runs the one DynamicBatcher   (serve.inference)
      |- worker 0 .. N-1    uvicorn, each on its own SO_REUSEPORT socket on the port: HTTP parsing, limits,
                            API key, decoding and preprocessing; worker 0 also serves gRPC  (serve.remote)

On CPUs with ONNX Runtime each worker runs its own model instead (measured faster there, see
`serve.inference.placement`); the inference process then opens none and only coordinates: readiness
and the merged statistics, so everything below holds in both arrangements.

Workers talk to the inference process over a Unix socket (small pickled control messages) and hand
it float32 batches through a `multiprocessing.shared_memory` block per worker, cut into slots (serve.ipc):
the worker writes a request's batch into a free slot, sends (request id, slot, shape), and the inference
process feeds a view of the slot to the batcher, so requests from every worker meet in one runner
call, then writes the logits back into the slot. Requests larger than a slot travel inline.

Readiness is decided by the inference process: ready once the model is warmed up and every worker is
connected. A worker whose inference process is gone is not ready and answers inference 503 at once
(pending requests too). Statistics: each process counts its own share (workers the requests, the
inference process the runner calls); the inference process merges them for `/metrics` and the v2 API.

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
import socket
import tempfile
import time
from dataclasses import replace
from typing import Any

from toolkit.card import ModelCard
from toolkit.runtime.base import Runner

from .config import ServeConfig
from .errors import ServeStartupError
from .inference import _inference_main, placement
from .ipc import _logging, _name_process, _run, default_cores
from .remote import RemoteBatcher, RemoteModel

log = logging.getLogger("toolkit.serve")


def default_workers() -> int:
    """`--workers` default: one front-end process per core, at most 8: past that the one inference
    process (and on CPUs the model's own threads) is the limit, not HTTP parsing and decoding."""
    return max(1, min(default_cores(), 8))


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


def _worker_main(index: int, port: int, config: ServeConfig, path: str, card_json: str,
                 info: dict[str, Any], level: str, spec: Any = None) -> None:
    from .app import create_app
    from .server import DrainingServer, uvicorn_config

    _logging(level)
    _name_process(f"toolkit-worker{index}")
    parent = os.getppid()
    worker_config = config if index == 0 else replace(config, grpc_port=0)  # gRPC lives in worker 0
    model: Runner
    if spec is not None:  # a model in this worker; the inference process only coordinates
        try:
            model = spec.open()
        except Exception as exc:  # noqa: BLE001 - the reason, in one line; the parent stops the server
            log.error("worker %d cannot open the model: %s", index, str(exc) or type(exc).__name__)
            raise SystemExit(1) from None
        app = create_app(model, worker_config, remote=RemoteBatcher(path, index, model, config, False))
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
        spec = self.spec if self.per_worker else None
        process = self.ctx.Process(target=_worker_main, name=f"toolkit-worker-{index}", daemon=False,
                                   args=(index, self.port, self.config, self.path, card_json, info,
                                         self.level, spec))
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
        hub_alive = True
        serving = False  # the server was ready once: before that, a dying worker is a failed start
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
            sentinels = [p.sentinel for p in alive] + ([hub.sentinel, control] if hub_alive else [])
            ready = multiprocessing.connection.wait(sentinels, timeout=0.25)
            if control in ready:
                with contextlib.suppress(EOFError, OSError):
                    serving = serving or control.recv() == ("serving",)
            if hub_alive and not hub.is_alive():
                hub_alive = False
                log.error("the inference process (pid %d) died (exit code %s): the server is not ready and "
                          "answers inference with 503", hub.pid, hub.exitcode)
            if self.stopping:
                continue
            for index, process in list(self.procs.items()):
                if process.is_alive():
                    continue
                process.join()
                if not serving:
                    raise ServeStartupError(f"cannot serve {self.config.name!r}: worker {index} exited (code "
                                            f"{process.exitcode}) before the server was ready; see its log")
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


def serve_workers(spec: Any, config: ServeConfig, workers: int, log_level: str = "info",
                  runner_per_worker: bool | None = None, instances: int | None = None) -> None:
    """Serve with `workers` front-end processes and one inference process opening `spec` (a
    `RunnerSpec` or any picklable object whose `open()` returns a Runner). Blocks until SIGTERM or
    SIGINT, then drains every worker. Raises ServeStartupError when the model cannot be served.

    `runner_per_worker`: each worker opens its own Runner and batches its own requests, the inference
    process only coordinating (None: ONNX Runtime on CPU, see `placement`). `instances`: otherwise,
    copies of the model behind the one batcher."""
    spec, copies, per_worker = placement(spec, workers, instances, runner_per_worker)
    Supervisor(spec, config, workers, log_level, per_worker, copies).run()
