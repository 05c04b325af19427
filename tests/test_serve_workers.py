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
    found = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
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
    assert "cannot open the model: no such accelerator" in output
    assert "refused: cannot serve 'broken': worker" in output and "before the server was ready" in output
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

    data = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(data.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    body = header + data.tobytes()
    _, batch = protocol.parse_infer(body, str(len(header)), None, ServeConfig(), sample_onnx_runner.card,
                                    protocol.ProtocolState())
    assert np.shares_memory(batch, np.frombuffer(body, np.uint8))
    np.testing.assert_array_equal(batch, data)
