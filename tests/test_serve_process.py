"""`toolkit serve` as a real process: start, answer, and drain on SIGTERM (in-flight finish, new get 503)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from support.serve import free_port, png_bytes, wait_for

pytestmark = pytest.mark.slow


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_cli_serves_onnx_by_file_stem_and_exits_cleanly_on_sigterm(sample_onnx_fp32, sample_test):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(sample_onnx_fp32),
                                "--port", str(port), "--max-batch-size", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/v2/health/ready", timeout=60)
        stem = sample_onnx_fp32.stem
        assert httpx.post(f"{base}/v2/repository/index").json()[0]["name"] == stem
        response = httpx.post(f"{base}/predict", content=png_bytes(sample_test.images[0]))
        assert response.json()["predictions"][0]["top"][0]["index"] == int(sample_test.labels[0])
        assert httpx.get(f"{base}/").text.count("drop") >= 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        _stop(process)


DRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from support.serve import SlowRunner
    from serve.config import ServeConfig
    from serve.server import serve
    from toolkit.runtime.registry import open_model
    runner = SlowRunner(open_model({model!r}), 0.0)
    import serve.control as control
    original = control.warm_up
    async def warm_then_slow(*args):
        await original(*args)
        runner.delay_s = 1.5
    control.warm_up = warm_then_slow
    serve(runner, ServeConfig(name="digits", port={port}, max_batch_size=1), log_level="warning")
    print("exited cleanly", flush=True)
""")


def test_sigterm_drains(sample_onnx_fp32, sample_test, tmp_path):
    from pathlib import Path

    port = free_port()
    script = tmp_path / "drain.py"
    script.write_text(DRAIN_SCRIPT.format(tests=str(Path(__file__).parent), model=str(sample_onnx_fp32),
                                          port=port))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/v2/health/ready", timeout=60)
        body = png_bytes(sample_test.images[0])
        result: dict[str, httpx.Response] = {}
        inflight = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{base}/predict", content=body, timeout=30)))
        inflight.start()
        time.sleep(0.5)  # the request is now inside the 1.5 s runner call
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{base}/predict", content=body, timeout=5)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert httpx.get(f"{base}/v2/health/ready").status_code == 503
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        inflight.join(30)
        assert result["r"].status_code == 200  # the in-flight request finished
        assert process.wait(20) == 0
        assert "exited cleanly" in (process.stdout.read() if process.stdout else "")
    finally:
        _stop(process)


@pytest.mark.parametrize("extra, says", [
    (["--device", "cuda"], "a GPU is shared through one inference process"),
    (["--model-instances", "2"], "--model-instances applies to --shared-runner"),
])
def test_runner_per_worker_refuses_what_it_cannot_do(sample_onnx_fp32, extra, says):
    """Refused before anything starts: exit 2 and one line (no process, no port taken)."""
    from support.cli import invoke

    result = invoke("serve", "-m", sample_onnx_fp32, "--workers", "2", "--runner-per-worker",
                    "--grpc-port", "0", "--port", free_port(), *extra)
    assert result.exit_code == 2 and says in result.output, result.output
