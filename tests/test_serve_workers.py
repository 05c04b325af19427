"""`toolkit serve --workers 2` as real processes: two front-end workers sharing the port, one inference
process, in both arrangements (a model in every worker, the inference process coordinating; or one
shared model behind one batcher). Answers, aggregated metrics, SIGTERM drain across workers, a killed
worker replaced, a killed inference process turning the server not ready with 503s (never a hang), a
worker that cannot start stopping the server with the reason."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from support.serve import free_port, png_bytes, wait_for

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


class Server:
    """A server process whose output is collected line by line (pids are read from its log)."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port, self.base = port, f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pid_of(self, what: str) -> int:
        found = re.findall(rf"{what} started \(pid (\d+)\)", self.output)
        assert found, self.output
        return int(found[-1])

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                wait_for(f"{self.base}/v2/health/ready", timeout=1)
                return
            except TimeoutError:
                continue
        raise AssertionError(f"not ready (exit code {self.process.poll()}):\n{self.output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


def cli_server(model: Path, *extra: str) -> Server:
    port = free_port()
    grpc = [] if "--grpc-port" in extra else ["--grpc-port", "0"]
    return Server([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(model), "--port", str(port),
                   "--workers", "2", "--max-batch-size", "16", *grpc, *extra], port)


KEY = {"X-API-Key": "k3y"}


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


ARRANGEMENTS = ["--runner-per-worker", "--shared-runner"]


@pytest.fixture(scope="module", params=ARRANGEMENTS)
def server(sample_onnx_fp32, request):
    """The module's server: --workers 2 in each arrangement, an API key, gRPC in worker 0."""
    server = cli_server(sample_onnx_fp32, request.param, "--api-key", "k3y", "--grpc-port", str(free_port()))
    server.grpc = server.process.args[server.process.args.index("--grpc-port") + 1]  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_answers_equal_offline_predict_under_64_concurrent_distinct_images(server, sample_test,
                                                                          sample_onnx_runner):
    from toolkit.evaluate import softmax
    from toolkit.preprocess import preprocess

    images = sample_test.images[:64]
    assert len({image.tobytes() for image in images}) == 64
    expected = softmax(sample_onnx_runner(preprocess(images, sample_onnx_runner.card)))

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base, timeout=60, headers=KEY,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return list(await asyncio.gather(*(client.post("/predict", content=png_bytes(image))
                                               for image in images)))

    before = httpx.get(f"{server.base}/metrics", headers=KEY).text
    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 64
    for i, response in enumerate(responses):
        top = response.json()["predictions"][0]["top"][0]
        assert top["index"] == int(expected[i].argmax())
        assert top["probability"] == pytest.approx(float(expected[i].max()), abs=1e-5)

    # totals over both workers and the inference process
    after = httpx.get(f"{server.base}/metrics", headers=KEY).text
    success = "nv_inference_request_success"
    assert metric(after, success) - metric(before, success) == 64
    assert metric(after, "nv_inference_count") - metric(before, "nv_inference_count") == 64
    executions = metric(after, "nv_inference_exec_count") - metric(before, "nv_inference_exec_count")
    assert 4 <= executions <= 64  # batches of at most 16, counted in every process
    assert metric(after, "toolkit_workers") == 2
    stats = httpx.get(f"{server.base}/v2/models/stats", headers=KEY).json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == metric(after, "nv_inference_request_success")


def test_metrics_totals_equal_requests_sent_over_both_workers(server, sample_test):
    before = httpx.get(f"{server.base}/metrics", headers=KEY).text
    body = png_bytes(sample_test.images[0])
    tensor = {"inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32",
                          "data": [0.5] * (2 * 3 * 32 * 32)}]}
    for _ in range(10):  # new connections: the kernel spreads them over the workers
        assert httpx.post(f"{server.base}/predict", content=body, headers=KEY).status_code == 200
        infer = httpx.post(f"{server.base}/v2/models/sample/infer", json=tensor, headers=KEY)
        assert infer.status_code == 200
        bad = httpx.post(f"{server.base}/predict", content=b"not an image", headers=KEY)
        assert bad.status_code in (400, 415)
    after = httpx.get(f"{server.base}/metrics", headers=KEY).text
    success = "nv_inference_request_success"
    assert metric(after, success) - metric(before, success) == 20
    assert metric(after, "nv_inference_count") - metric(before, "nv_inference_count") == 30
    failed = re.search(r'nv_inference_request_failure\{[^}]*reason="OTHER"\} (\S+)', after)
    failed_before = re.search(r'nv_inference_request_failure\{[^}]*reason="OTHER"\} (\S+)', before)
    assert failed and failed_before and float(failed.group(1)) - float(failed_before.group(1)) == 10
    assert metric(after, "toolkit_requests_in_flight") == 0


def test_api_key_and_grpc_across_workers(server, sample_test, sample_onnx_runner):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from toolkit.preprocess import preprocess

    body = png_bytes(sample_test.images[0])
    for _ in range(6):  # new connections land on both workers: each refuses without the key
        assert httpx.post(f"{server.base}/predict", content=body).status_code == 401
        assert httpx.get(f"{server.base}/metrics").status_code == 401
    assert httpx.get(f"{server.base}/v2/health/ready").status_code == 200  # open, as documented
    before = httpx.get(f"{server.base}/metrics", headers=KEY).text
    batch = preprocess(sample_test.images[:3], sample_onnx_runner.card)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    try:
        assert client.is_server_ready(headers={"x-api-key": "k3y"})
        tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer("sample", [tensor], headers={"x-api-key": "k3y"})
    finally:
        client.close()
    np.testing.assert_allclose(result.as_numpy("logits"), sample_onnx_runner(batch), atol=1e-4)
    after = httpx.get(f"{server.base}/metrics", headers=KEY).text
    success = "nv_inference_request_success"
    assert metric(after, success) - metric(before, success) == 1  # the gRPC request, counted in the sum


DRAIN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from support.serve import SlowSpec
    from serve.config import ServeConfig
    from serve.workers import serve_workers

    if __name__ == "__main__":
        serve_workers(SlowSpec({model!r}, {delay}), ServeConfig(name="digits", port={port}, max_batch_size=4,
                      workers=2), 2, runner_per_worker={per_worker})
        print("exited cleanly", flush=True)
""")


@pytest.mark.parametrize("per_worker", [True, False], ids=["model-per-worker", "shared-model"])
def test_sigterm_drains_in_flight_requests_across_workers(sample_onnx_fp32, sample_test, tmp_path,
                                                          per_worker):
    port = free_port()
    script = tmp_path / "drain.py"
    script.write_text(DRAIN.format(root=str(TESTS.parent), tests=str(TESTS), model=str(sample_onnx_fp32),
                                   port=port, delay=0.8, per_worker=per_worker))
    server = Server([sys.executable, str(script)], port)
    try:
        server.wait_ready()
        body = png_bytes(sample_test.images[0])
        results: list[int] = []

        def send() -> None:
            with httpx.Client(timeout=60) as client:  # one connection each: spread over both workers
                results.append(client.post(f"{server.base}/predict", content=body).status_code)

        threads = [threading.Thread(target=send) for _ in range(12)]  # 3+ runner calls of 0.8 s
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # all 12 inside the server (the sum over both workers)
            if metric(httpx.get(f"{server.base}/metrics").text, "toolkit_requests_in_flight") >= 12:
                break
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        wait_for(f"{server.base}/v2/health/ready", status=503, timeout=10)
        refused = httpx.post(f"{server.base}/predict", content=body, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        for thread in threads:
            thread.join(60)
        assert results == [200] * 12, results  # no request lost
        assert server.process.wait(30) == 0
        server._reader.join(5)
        assert "exited cleanly" in server.output
        assert "Traceback" not in server.output, server.output
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_and_reported(sample_onnx_fp32, sample_test):
    server = cli_server(sample_onnx_fp32)
    try:
        server.wait_ready()
        victim = server.pid_of("worker 1")
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.pid_of("worker 1") == victim:
            time.sleep(0.1)
        assert server.pid_of("worker 1") != victim
        assert f"worker 1 (pid {victim}) died" in server.output
        server.wait_ready()
        body = png_bytes(sample_test.images[0])
        for _ in range(6):
            assert httpx.post(f"{server.base}/predict", content=body).status_code == 200
        text = httpx.get(f"{server.base}/metrics").text
        assert metric(text, "toolkit_worker_restarts") == 1
        assert metric(text, "toolkit_workers") == 2
    finally:
        server.stop()


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_a_killed_inference_process_turns_the_server_not_ready_with_503s(sample_onnx_fp32, sample_test,
                                                                         arrangement):
    server = cli_server(sample_onnx_fp32, arrangement)
    try:
        server.wait_ready()
        os.kill(server.pid_of("inference process"), signal.SIGKILL)
        wait_for(f"{server.base}/v2/health/ready", status=503, timeout=10)
        body = png_bytes(sample_test.images[0])
        tensor = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                              "data": [0.5] * (3 * 32 * 32)}]}
        for _ in range(4):  # both workers, never a hang
            started = time.monotonic()
            assert httpx.post(f"{server.base}/predict", content=body, timeout=10).status_code == 503
            answer = httpx.post(f"{server.base}/v2/models/sample/infer", json=tensor, timeout=10)
            assert answer.status_code == 503
            assert time.monotonic() - started < 5
        assert httpx.get(f"{server.base}/v2/health/live").status_code == 200
        assert "the inference process" in server.output and "died" in server.output
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    finally:
        server.stop()


FAILING = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from serve.config import ServeConfig
    from serve.errors import ServeStartupError
    from serve.workers import serve_workers

    class Broken:
        def open(self):
            raise RuntimeError("no such accelerator")

    if __name__ == "__main__":
        try:
            config = ServeConfig(name="broken", port={port}, workers=2)
            serve_workers(Broken(), config, 2, runner_per_worker=True)
        except ServeStartupError as exc:
            print("refused:", exc, flush=True)
            sys.exit(1)
""")


def test_a_worker_that_cannot_open_the_model_stops_the_server_with_the_reason(tmp_path):
    """A model in every worker: the model opens in the workers, so a failure there is a failed start
    (exit 1, the reason in the log), never a loop of replaced workers."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(root=str(TESTS.parent), tests=str(TESTS), port=free_port()))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "worker 0: no such accelerator" in output or "worker 1: no such accelerator" in output
    assert ("refused: cannot serve: load failed for model 'broken': version 1 is at UNAVAILABLE state: "
            "no such accelerator") in output
    assert output.count("started (pid") <= 3  # the inference process and the two workers: no restarts


def test_one_batcher_spreads_batches_over_model_copies(sample_card):
    """The inference process's batcher with two copies of the model (ONNX Runtime on CPU): one queue,
    batches run on whichever copy is idle, every answer back to its own request."""
    from fakes.runners import ConstantRunner
    from serve.batcher import DynamicBatcher
    from serve.metrics import Stats

    class Slow(ConstantRunner):
        def __init__(self) -> None:
            super().__init__(sample_card, source="fake")
            self.calls = 0

        def _infer(self, batch):  # type: ignore[no-untyped-def]
            self.calls += 1
            time.sleep(0.2)
            return super()._infer(batch)

    copies = [Slow(), Slow()]
    stats = Stats()
    shape = (1, *sample_card.input_size)

    async def main() -> tuple[list[int], float]:
        batcher = DynamicBatcher(copies[0], stats, max_batch_size=2, instances=copies)
        await batcher.start()
        try:
            began = time.perf_counter()
            signs = [1.0 if i % 2 else -1.0 for i in range(8)]
            answers = await asyncio.gather(*(batcher.infer(np.full(shape, s, np.float32)) for s in signs))
            return [int(a.argmax()) for a in answers], time.perf_counter() - began
        finally:
            await batcher.stop()

    answers, seconds = asyncio.run(main())
    assert answers == [1 if i % 2 else 0 for i in range(8)]
    assert all(copy.calls >= 1 for copy in copies)  # both copies ran batches
    assert stats.inference_count == 8 and stats.exec_count == sum(copy.calls for copy in copies)
    assert seconds < 0.2 * stats.exec_count - 0.1  # copies ran at the same time


def test_binary_v2_tensors_are_read_in_place(sample_onnx_runner):
    """The float32 batch a binary v2 request yields is a view of the request body: no copy before the
    one into the worker's shared-memory slot."""
    import json

    from serve import protocol
    from serve.config import ServeConfig
    from serve.models import ModelDescription, ServedModel
    from serve.repository import ModelSettings

    data = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(data.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    body = header + data.tobytes()
    model = ServedModel(1, "sample", "1", ModelDescription.of(sample_onnx_runner), ModelSettings(),
                        batcher=None)  # type: ignore[arg-type] - parsing reaches no batcher
    _, batch = protocol.parse_infer(body, str(len(header)), None, model, ServeConfig(),
                                    protocol.ProtocolState())
    assert np.shares_memory(batch, np.frombuffer(body, np.uint8))
    np.testing.assert_array_equal(batch, data)


# --- the whole server holds system shared-memory regions, whichever worker answers (issue 19) ---------

GRPC_KEY = {"x-api-key": "k3y"}  # gRPC metadata keys are lowercase (HTTP's are case-insensitive)
PERF_ANALYZER = TESTS.parent / "bench" / ".tools" / "perf_analyzer"
CUDA_RUNTIME = TESTS.parent / "bench" / ".tools" / "cuda" / "nvidia" / "cuda_runtime" / "lib"


def test_system_shared_memory_holds_whichever_worker_answers(server, sample_test, sample_onnx_runner):
    """Registered over one connection, used over fresh ones (the kernel spreads them over both workers) and
    over gRPC (worker 0); unregistered over gRPC, gone for every HTTP connection."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    from toolkit.preprocess import preprocess

    batch = preprocess(sample_test.images[:2], sample_onnx_runner.card)
    expected = sample_onnx_runner(batch)
    tag = f"{os.getpid()}_{server.port}"
    regions = {"in": shm.create_shared_memory_region("in", f"/tk_in_{tag}", batch.nbytes),
               "out": shm.create_shared_memory_region("out", f"/tk_out_{tag}", expected.nbytes)}
    shm.set_shared_memory_region(regions["in"], [batch])
    address = server.base.removeprefix("http://")

    def infer(client: Any, module: Any) -> np.ndarray:
        shm.set_shared_memory_region(regions["out"], [np.zeros_like(expected)])
        tensor = module.InferInput("input", list(batch.shape), "FP32")
        tensor.set_shared_memory("in", batch.nbytes)
        output = module.InferRequestedOutput("logits")
        output.set_shared_memory("out", expected.nbytes)
        client.infer("sample", [tensor], outputs=[output], headers=GRPC_KEY)
        return shm.get_contents_as_numpy(regions["out"], np.float32, list(expected.shape))

    try:
        with httpclient.InferenceServerClient(address) as first:
            first.register_system_shared_memory("in", f"/tk_in_{tag}", batch.nbytes, headers=KEY)
            first.register_system_shared_memory("out", f"/tk_out_{tag}", expected.nbytes, headers=KEY)
        for _ in range(8):
            with httpclient.InferenceServerClient(address) as client:
                status = client.get_system_shared_memory_status(headers=KEY)
                assert sorted(region["name"] for region in status) == ["in", "out"]
                np.testing.assert_allclose(infer(client, httpclient), expected, atol=1e-5)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}") as client:
            np.testing.assert_allclose(infer(client, grpcclient), expected, atol=1e-5)
            client.unregister_system_shared_memory(headers=GRPC_KEY)
        for _ in range(6):
            with httpclient.InferenceServerClient(address) as client:
                assert client.get_system_shared_memory_status(headers=KEY) == []
    finally:
        for handle in regions.values():
            shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_with_system_shared_memory(server, protocol):
    """Triton's own load generator, `perf_analyzer --shared-memory system`, against the default workers:
    it registers its regions over one connection and sends requests over several."""
    if not PERF_ANALYZER.exists():
        pytest.skip("perf_analyzer is not installed here: `make perf-analyzer` puts it in bench/.tools")
    url = f"127.0.0.1:{server.grpc}" if protocol == "grpc" else server.base.removeprefix("http://")
    done = subprocess.run(
        [str(PERF_ANALYZER), "-m", "sample", "-u", url, "-i", protocol, "--shared-memory", "system",
         "--concurrency-range", "8:8", "--measurement-mode", "count_windows", "--measurement-request-count",
         "40", "--max-trials", "3", "-s", "1000", "-H", "x-api-key:k3y"],  # any spread is stable: a
        capture_output=True, text=True, timeout=240,  # shared box; what counts is that every request worked
        env={**os.environ, "LD_LIBRARY_PATH": str(CUDA_RUNTIME)})
    output = done.stdout + done.stderr
    if "error while loading shared libraries" in output:
        pytest.skip(f"perf_analyzer cannot start here: {output.strip().splitlines()[-1]}")
    assert done.returncode == 0, output[-2000:]
    assert "throughput" in output.lower() and "unknown shared memory region" not in output


# --- ports: taken is one line and exit 1 at once, naming the flag (issue 19) --------------------------

def _second_server(model: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(model), *flags],
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def test_a_second_server_on_a_taken_port_exits_at_once_naming_it(server, sample_onnx_fp32):
    """`toolkit serve` beside a running one: the same gRPC port (its default, 8001, in real life) or the
    same HTTP port is refused before any process starts, with the flag that changes it."""
    done, seconds = _second_server(sample_onnx_fp32, "--port", str(free_port()), "--grpc-port", server.grpc,
                                   "--workers", "2")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"cannot listen for gRPC on 127.0.0.1:{server.grpc}: address already in use" in output
    assert "--grpc-port 0 turns gRPC off" in output and "started (pid" not in output
    assert seconds < 60  # the CLI's start-up, not a restart loop
    done, _ = _second_server(sample_onnx_fp32, "--port", str(server.port), "--grpc-port", "0")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{server.port}" in output, output
    assert "--port chooses another" in output
    assert httpx.get(f"{server.base}/v2/health/ready").status_code == 200  # the first one is untouched


def test_bounded_restarts_back_off_then_stop():
    from serve.workers import BACKOFF_MAX_S, MAX_RESTARTS, RESTART_WINDOW_S, _Restarts

    restarts = _Restarts()
    delays = [restarts.record(float(i)) for i in range(MAX_RESTARTS)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0][:MAX_RESTARTS] and all(d <= BACKOFF_MAX_S for d in delays)  # type: ignore[operator]
    assert restarts.record(float(MAX_RESTARTS)) is None  # one more within the window stops the server
    forgotten = _Restarts([-RESTART_WINDOW_S - 1.0] * 9)  # deaths longer ago than the window do not count
    assert forgotten.record(0.0) == _Restarts().record(0.0) == 0.5
