"""`toolkit serve` as a real process under attack: memory stays flat, and a model it cannot run exits 1.

RSS is read from /proc (VmHWM: the peak) before and after the hostile requests, so a limit that
only looks right (a 413 sent after inflating the bomb anyway) fails here.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from support.serve import free_port, png_bytes, wait_for, zip_with_declared_size

pytestmark = pytest.mark.slow


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _huge_header(port: int, size: int) -> bytes:
    """Stream a `size`-byte header line until the server stops reading; whatever it answered."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        with contextlib.suppress(OSError):  # the server closed the connection: it stopped reading
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
        with contextlib.suppress(OSError):  # a reset after the answer ends the read like a close
            while data := sock.recv(65536):
                answer += data
    return answer


def test_hostile_requests_leave_rss_flat_and_the_process_alive(sample_onnx_fp32, sample_test):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(sample_onnx_fp32),
                                "--port", str(port), "--max-body-mb", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/v2/health/ready", timeout=60)
        good = png_bytes(sample_test.images[0])
        for _ in range(20):
            assert httpx.post(f"{base}/predict", content=good).status_code == 200
        peak_before = _vm(process.pid, "VmHWM")

        answer = _huge_header(port, 64 * 1024 * 1024)
        assert not answer.startswith(b"HTTP/1.1 200")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
        for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2):
            response = httpx.post(f"{base}/evaluate", content=zip_with_declared_size(
                "set/cat/a.png", bytes(192 * 1024 * 1024), method, declared=1000),
                                  headers={"Content-Type": "application/zip"}, timeout=60)
            assert response.status_code == 413 and "error" in response.json()
        nested = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        infer = f"{base}/v2/models/{sample_onnx_fp32.stem}/infer"
        assert httpx.post(infer, content=nested).status_code == 400

        growth = _vm(process.pid, "VmHWM") - peak_before
        assert growth < 48 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MB"
        assert process.poll() is None
        assert httpx.post(f"{base}/predict", content=good).status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output, output[-3000:]


def test_a_model_the_server_cannot_run_exits_1_with_the_reason(sample_onnx_fp32, tmp_path):
    import onnx

    model = onnx.load(str(sample_onnx_fp32))
    for prop in model.metadata_props:
        if prop.key == "toolkit.card":
            card = json.loads(prop.value)
            card["input_size"] = [3, 40, 40]  # the graph takes 32x32
            prop.value = json.dumps(card)
    bad = tmp_path / "disagrees.onnx"
    onnx.save(model, str(bad))
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(bad), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "40" in result.stderr and ("32" in result.stderr or "input" in result.stderr), result.stderr
