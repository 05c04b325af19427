"""Benchmark `toolkit serve` against the same Runner offline, in one run, on loopback.

Model: CIFAR ResNet-56 exported to ONNX with RANDOM weights (BatchNorm statistics re-estimated on
random images, so activations stay in range): speed does not depend on the weight values.

Reports, all as ratios against baselines measured in the same run:
  1. offline best-batch throughput of the ONNX Runtime Runner (batch 1..64) and its batch-1 latency;
  2. server throughput, 32 concurrent clients sending CIFAR-size PNGs: batching on vs the offline best
     (target >= 0.8x) and vs batching off (--max-batch-size 1; expect ~1.3x);
  3. p50/p99 latency at concurrency 1 and 32; p50 at concurrency 1 vs the Runner's batch-1 latency
     (target <= +3 ms);
  4. --load-test: the same load with malformed requests mixed in: wrong answers, 5xx, process alive,
     RSS before/after.
The load generator is a lean asyncio HTTP/1.1 keep-alive client (a few µs per request), so the
figures measure the server, not the client. Client and server share this machine's CPU cores.

    python bench/bench_serve.py [--requests 1500] [--load-test] [--onnx PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_resnet56(path: Path) -> Path:
    """Random-init CIFAR ResNet-56 with BN stats re-estimated on random inputs, exported by export.onnx."""
    import torch

    from export.onnx import export
    from toolkit.archs import build_model
    from toolkit.card import CIFAR10_CLASSES, ModelCard, preset

    torch.manual_seed(0)
    model = build_model("resnet56", 10, shortcut="A")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32))
    model.eval()
    values = preset("cifar10")
    card = ModelCard(arch="resnet56", class_names=CIFAR10_CLASSES, input_size=(3, 32, 32),
                     mean=values["mean"],
                     std=values["std"], resize_size=32, shortcut="A",
                     extra={"note": "random weights, benchmark only"})
    return export(model, card, path)


# --- offline baselines -------------------------------------------------------------------------------

def offline(runner, card, images: np.ndarray) -> dict[str, float]:
    from toolkit.preprocess import preprocess

    batch = preprocess(images[:64], card)
    best, per_batch = 0.0, {}
    for size in (1, 4, 8, 16, 32, 64):
        x = batch[:size]
        runner(x)
        n, began = 0, time.perf_counter()
        while time.perf_counter() - began < 1.5:
            runner(x)
            n += size
        per_batch[size] = n / (time.perf_counter() - began)
        best = max(best, per_batch[size])
    one = batch[:1]
    latencies = []
    for _ in range(300):
        began = time.perf_counter()
        runner(one)
        latencies.append(time.perf_counter() - began)
    return {"best_ips": best, "per_batch": per_batch, "batch1_p50_ms": 1000 * statistics.median(latencies)}


# --- the lean client -------------------------------------------------------------------------------

class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.writer = None
        return status, payload


async def load(port: int, jobs: list[tuple[str, str, bytes, dict[str, str], int | None]], concurrency: int
               ) -> tuple[float, list[float], list[tuple[int, bytes, int | None]]]:
    """`jobs` on `concurrency` keep-alive connections -> (seconds, latencies, (status, body, expected))."""
    index = 0
    latencies: list[float] = []
    results: list[tuple[int, bytes, int | None]] = []

    async def worker() -> None:
        nonlocal index
        conn = Connection(port)
        while index < len(jobs):
            method, path, body, headers, expected = jobs[index]
            index += 1
            began = time.perf_counter()
            try:
                status, payload = await conn.request(method, path, body, headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                status, payload, conn = -1, b"", Connection(port)
            latencies.append(time.perf_counter() - began)
            results.append((status, payload, expected))
        if conn.writer is not None:
            conn.writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, latencies, results


# --- the server process -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(onnx: Path, port: int, max_batch_size: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(onnx),
                                "--name", "r56",
                                "--port", str(port), "--max-batch-size", str(max_batch_size),
                                "--max-queue", "512"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode() if process.stderr else "server died")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not become ready")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return -9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def top1(body: bytes) -> int:
    return int(json.loads(body)["predictions"][0]["top"][0]["index"])


def pct(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q))


# --- malformed requests for the load test ------------------------------------------------------------

def _zip_declaring(method: int, size: int, declared: int = 1000) -> bytes:
    """A zip bomb: one member whose headers claim `declared` bytes while it inflates to `size` zeros."""
    import struct
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr("set/cat/a.png", bytes(size))
    raw = bytearray(buffer.getvalue())
    offset = zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist()[0].header_offset
    struct.pack_into("<I", raw, offset + 22, declared)
    struct.pack_into("<I", raw, raw.rfind(b"PK\x01\x02") + 24, declared)
    return bytes(raw)


def malformed_jobs(png: bytes) -> list[tuple[str, str, bytes, dict[str, str], int | None]]:
    """Client mistakes and attacks (issue 9): every one must be a 4xx, none may disturb the good requests."""
    import zipfile

    from PIL import Image

    huge = io.BytesIO()
    Image.new("L", (9000, 9000)).save(huge, "PNG")

    def infer(shape: object, data: object = None, **extra: object) -> bytes:
        tensor = {"name": "input", "shape": shape, "datatype": "FP32",
                  "data": [0.5] if data is None else data}
        return json.dumps({"inputs": [tensor], **extra}).encode()

    image = [0.5] * (3 * 32 * 32)
    zip_type = {"Content-Type": "application/zip"}
    return [
        ("POST", "/predict", png[: len(png) // 2], {}, None),  # truncated PNG
        ("POST", "/predict", b"this is not an image", {}, None),
        ("POST", "/predict", huge.getvalue(), {}, None),  # 81 MP: over --max-pixels
        ("POST", "/predict", b"", {}, None),
        ("POST", "/predict", b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=zz"}, None),
        ("POST", "/v2/models/r56/infer", infer([1, 3, 28, 28], [0.0] * (3 * 28 * 28)), {}, None),
        ("POST", "/v2/models/r56/infer", b"{broken json", {}, None),
        ("POST", "/v2/models/nope/infer", b"{}", {}, None),
        ("GET", "/v2/models/nope", b"", {}, None),
        ("GET", "/v2/models/nope/ready", b"", {}, None),
        ("POST", "/v2/models/r56/infer", infer([10**20]), {}, None),
        ("POST", "/v2/models/r56/infer", infer([2**62, 4]), {}, None),
        ("POST", "/v2/models/r56/infer", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, None),
        ("POST", "/v2/models/r56/infer", infer([1, 3, 32, 32], image, outputs=5), {}, None),
        ("POST", "/v2/models/r56/infer", infer([1, 3, 32, 32], image, outputs=True), {}, None),
        ("POST", "/evaluate", _zip_declaring(zipfile.ZIP_DEFLATED, 256 * 1024 * 1024), zip_type, None),
        ("POST", "/evaluate", _zip_declaring(zipfile.ZIP_BZIP2, 64 * 1024 * 1024), zip_type, None),
        ("GET", "/v2/health/live", b"", {"X-Big": "a" * (128 * 1024)}, None),  # over the 64 KB head: 431
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests per concurrency-32 measurement")
    parser.add_argument("--onnx", type=Path, help="reuse this ResNet-56 ONNX instead of building one")
    parser.add_argument("--load-test", action="store_true", help="also run the malformed-request load test")
    parser.add_argument("--load-rounds", type=int, default=3, help="load-test rounds")
    parser.add_argument("--load-good", type=int, default=600, help="good requests per load-test round")
    parser.add_argument("--load-bad", type=int, default=20, help="repeats of each hostile request per round")
    args = parser.parse_args()

    with contextlib.suppress(ImportError):  # uvloop is optional: a faster client loop where installed
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from toolkit.data import load_sample
    from toolkit.preprocess import preprocess
    from toolkit.runtime.registry import open_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    onnx = args.onnx or build_resnet56(workdir / "resnet56.onnx")
    images = load_sample("test").images[:256]
    from PIL import Image

    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        pngs.append(buffer.getvalue())

    print(f"machine: {os.cpu_count()} logical CPUs shared by client, server and (here) other work; "
          f"load average {os.getloadavg()[0]:.1f}")
    with open_model(onnx) as runner:
        base = offline(runner, runner.card, images)
        expected_top1 = runner(preprocess(images, runner.card)).argmax(1)
    print("offline Runner (onnxruntime, ResNet-56 random weights): "
          + ", ".join(f"b{b}={v:.0f}" for b, v in base["per_batch"].items())
          + f" img/s; best {base['best_ips']:.0f} img/s; batch-1 p50 {base['batch1_p50_ms']:.2f} ms")

    def jobs(n: int) -> list[tuple[str, str, bytes, dict[str, str], int | None]]:
        return [("POST", "/predict?top_k=1", pngs[i % len(pngs)], {"Content-Type": "image/png"},
                 int(expected_top1[i % len(pngs)])) for i in range(n)]

    summary: dict[str, float] = {}
    for label, max_batch in (("batching on (max 32)", 32), ("batching off (max 1)", 1)):
        port = free_port()
        server = start_server(onnx, port, max_batch)
        try:
            asyncio.run(load(port, jobs(200), 32))  # warm connections and caches
            seconds, lat32, res32 = asyncio.run(load(port, jobs(args.requests), 32))
            ips = args.requests / seconds
            wrong = sum(1 for s, b, e in res32 if s != 200 or top1(b) != e)
            line = (f"server {label}: c=32 {ips:.0f} img/s ({ips / base['best_ips']:.2f}x offline best), "
                    f"p50 {pct(lat32, 50):.1f} ms, p99 {pct(lat32, 99):.1f} ms, wrong/failed {wrong}")
            summary[f"ips_{max_batch}"] = ips
            if max_batch == 32:
                _, lat1, _ = asyncio.run(load(port, jobs(300), 1))
                summary["c1_p50"] = pct(lat1, 50)
                line += (f"; c=1 p50 {pct(lat1, 50):.2f} ms, p99 {pct(lat1, 99):.2f} ms "
                         f"(Runner batch-1 {base['batch1_p50_ms']:.2f} ms: "
                         f"+{pct(lat1, 50) - base['batch1_p50_ms']:.2f} ms)")
            print(line, flush=True)
            if args.load_test and max_batch == 32:
                load_test(port, server, jobs, pngs[0], args.load_rounds, args.load_good, args.load_bad)
        finally:
            code = stop_server(server)
            if code != 0:
                print(f"  server exit code {code}")
    print(f"ratios: batching on / offline best = {summary['ips_32'] / base['best_ips']:.2f} (target >= 0.8); "
          f"on / off = {summary['ips_32'] / summary['ips_1']:.2f} (expect ~1.3); "
          f"c=1 p50 - Runner batch-1 = {summary['c1_p50'] - base['batch1_p50_ms']:+.2f} ms (target <= +3)")


def load_test(port: int, server: subprocess.Popen, jobs, png: bytes, rounds: int = 3, good: int = 600,
              bad_repeats: int = 20) -> None:
    bad = malformed_jobs(png)
    rss = [rss_mb(server.pid)]
    totals = {"good": 0, "wrong": 0, "bad": 0, "5xx": 0, "bad_not_4xx": 0, "bad_closed": 0}
    odd: dict[tuple[int, bytes], int] = {}  # hostile, answered other than 4xx
    for _ in range(rounds):
        mixed = jobs(good) + bad * bad_repeats
        random.Random(0).shuffle(mixed)
        _, _, results = asyncio.run(load(port, mixed, 32))
        for status, body, expected in results:
            if expected is None:
                totals["bad"] += 1
                if status < 0:  # the server closed a hostile connection (the 128 KB head) unanswered
                    totals["bad_closed"] += 1
                    continue
                if not 400 <= status < 500:
                    totals["bad_not_4xx"] += 1
                    odd[(status, body[:120])] = odd.get((status, body[:120]), 0) + 1
                totals["5xx"] += status >= 500
            else:
                totals["good"] += 1
                totals["5xx"] += status >= 500 or status < 0
                totals["wrong"] += status != 200 or top1(body) != expected
        rss.append(rss_mb(server.pid))
    alive = server.poll() is None
    print(f"load test: {totals['good']} good requests ({totals['wrong']} wrong or lost answers), "
          f"{totals['bad']} hostile ({totals['bad_not_4xx']} answered but not 4xx, "
          f"{totals['bad_closed']} closed unanswered), "
          f"{totals['5xx']} 5xx or lost; process alive: {alive}; "
          f"RSS MB after warm-up and each of {rounds} rounds: {', '.join(f'{v:.0f}' for v in rss)}",
          flush=True)
    for (status, body), count in odd.items():
        print(f"  hostile answered {status} x{count}: {body!r}")


if __name__ == "__main__":
    main()
