"""Benchmark `toolkit serve` against the same Runner offline, in one run, on loopback.

Model: CIFAR ResNet-56 exported to ONNX with RANDOM weights (BatchNorm statistics re-estimated on
random images, so activations stay in range): speed does not depend on the weight values.

Reports, all as ratios against baselines measured in the same run, as a table over `--workers 1, 2,
4, ...` (up to the cores present; issue 11) in the default arrangement (ONNX Runtime on CPU: a model in
every worker), plus the other arrangement at the largest count (one inference process whose one
batcher every worker feeds: what GPUs use):
  1. offline best-batch throughput of the ONNX Runtime Runner (batch 1..64) and its batch-1 latency;
  2. server throughput, 32 concurrent clients sending CIFAR-size PNGs: batching on vs the offline best
     (target >= 0.8x) and vs batching off (--max-batch-size 1; expect ~1.3x);
  3. p50/p99 latency at concurrency 1 and 32; p50 at concurrency 1 vs the Runner's batch-1 latency
     (target <= +3 ms);
  4. --load-test: the same load with malformed requests mixed in: wrong answers, 5xx, process alive,
     RSS before/after.
The load generator is a lean asyncio HTTP/1.1 keep-alive client (a few µs per request), so the
figures measure the server, not the client. Client and server share this machine's CPU cores.

Server CPU per request: user+sys of every server process (parent, workers, inference process) over
the measurement, per request; "outside the model" subtracts the CPU of the threads that run the model
(every server thread but the processes' main threads, which run the event loops, and the decode
pools' threads), as /proc reports them.

    python bench/bench_serve.py [--requests 1500] [--workers 1,2] [--load-test] [--onnx PATH]
    python bench/bench_serve.py --device cuda [--precision fp16] [--concurrency 64]   # a GPU machine
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _timing import wait_until_ready  # noqa: E402 - bench/ is put on the path just above


def build_resnet56(path: Path) -> Path:
    """Random-init CIFAR ResNet-56 exported by export.onnx (what the CPU runs serve)."""
    from export.onnx import export

    return export(*random_resnet56(), path)


def save_resnet56_checkpoint(path: Path) -> Path:
    """The same model as a checkpoint with its card beside it (what `--device cuda` serves with torch)."""
    import torch

    model, card = random_resnet56()
    torch.save({"state_dict": model.state_dict()}, path)
    card.save(path.with_name(path.name + ".card.json"))
    return path


def random_resnet56():  # type: ignore[no-untyped-def]
    """CIFAR ResNet-56, random weights, BN statistics re-estimated on random inputs; and its card."""
    import torch

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
    return model, card


# --- offline baselines -------------------------------------------------------------------------------

def offline(runner, card, images: np.ndarray) -> dict[str, Any]:
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


def tree(pid: int) -> set[int]:
    """`pid` and every process below it (the server's workers and inference process)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def tree_cpu_s(pid: int) -> float:
    """user+sys CPU seconds of `pid` and every process below it (the server's workers, inference process)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def model_threads_cpu_s(pid: int) -> float:
    """CPU seconds of the threads that run the model in every server process: all but each process's
    main thread (its event loop: HTTP, JSON, IPC) and the decode pool's threads (named toolkit-decode)
    — the batcher's runner threads and ONNX Runtime's pools."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                if task.name == str(member) or (task / "comm").read_text().strip() == "toolkit-decode":
                    continue
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick
    return total


def scrape(port: int) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "reason=" not in line and "code=" not in line:
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


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


def start_server(model: Path, port: int, max_batch_size: int, workers: int = 1,
                 shared: bool = False, device: tuple[str, ...] = ()) -> subprocess.Popen:
    """`toolkit serve` of `model`; `device`: extra flags (`--device cuda --precision fp16`)."""
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "-m", str(model),
                                "--name", "r56", "--grpc-port", "0", "--workers", str(workers),
                                "--port", str(port), "--max-batch-size", str(max_batch_size),
                                "--max-queue", "512", *device] + (["--shared-runner"] * shared),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_until_ready(process, port, timeout_s=90)


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return -9


def rss_mb(pid: int) -> float:
    """Resident MB of the server: the process and its workers and inference process."""
    total = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def top1(body: bytes) -> int:
    answer = json.loads(body)
    if "outputs" in answer:  # a v2 response with JSON logits
        return int(np.argmax(answer["outputs"][0]["data"]))
    return int(answer["predictions"][0]["top"][0]["index"])


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


Job = tuple[str, str, bytes, dict[str, str], "int | None"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests per concurrency-32 measurement")
    parser.add_argument("--onnx", type=Path, help="reuse this ResNet-56 ONNX instead of building one")
    parser.add_argument("--load-test", action="store_true", help="also run the malformed-request load test")
    parser.add_argument("--load-rounds", type=int, default=3, help="load-test rounds")
    parser.add_argument("--load-good", type=int, default=600, help="good requests per load-test round")
    parser.add_argument("--load-bad", type=int, default=20, help="repeats of each hostile request per round")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", default=",".join(str(2 ** i) for i in range(8) if 2 ** i <= cores),
                        help="comma-separated --workers values for the scaling table (default: 1, 2, 4, ... "
                        "up to the cores present)")
    parser.add_argument("--no-alternative", action="store_true",
                        help="skip the measurement of the other arrangement (--shared-runner)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: serve a checkpoint with torch on the GPU (`--precision`, default fp16), "
                        "one shared inference process; issue 11's target there is >= 10,000 img/s at c=64")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="with --device cuda")
    parser.add_argument("--concurrency", type=int, help="clients for the throughput columns (default: 32 "
                        "on cpu, 64 on cuda)")
    args = parser.parse_args()
    args.workers = sorted(int(w) for w in str(args.workers).split(","))
    args.cuda = args.device == "cuda"
    args.concurrency = args.concurrency or (64 if args.cuda else 32)
    args.device_flags = ("--device", "cuda", "--precision", args.precision or "fp16") if args.cuda else ()
    return args


class Workload:
    """The model served, its offline baseline, and the requests sent: CIFAR-size PNGs to /predict and the
    same images as binary v2 tensors, each with the top-1 the offline runner gives it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from PIL import Image

        from toolkit.data import load_sample
        from toolkit.preprocess import preprocess
        from toolkit.runtime.registry import open_model

        workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        if args.cuda:
            self.served = save_resnet56_checkpoint(workdir / "resnet56.pt")
        else:
            self.served = args.onnx or build_resnet56(workdir / "resnet56.onnx")
        sample = load_sample("test").images
        assert sample is not None
        images = sample[:256]
        self.pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            self.pngs.append(buffer.getvalue())
        options = {"precision": args.device_flags[3]} if args.cuda else {}
        with open_model(self.served, device=args.device, **options) as runner:
            self.base = offline(runner, runner.card, images)
            self.top1 = runner(preprocess(images, runner.card)).argmax(1)
            card = runner.card
            self.backend = f"{runner.backend} {runner.precision} on {runner.device}"
        tensors = preprocess(images, card)
        one = {"name": "input", "shape": [1, *tensors.shape[1:]], "datatype": "FP32",
               "parameters": {"binary_data_size": tensors[0].nbytes}}
        header = json.dumps({"inputs": [one], "outputs": [{"name": "logits",
                                                           "parameters": {"binary_data": False}}]}).encode()
        self.v2_bodies = [header + tensors[i].tobytes() for i in range(len(tensors))]
        self.v2_headers = {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}

    def jobs(self, n: int) -> list[Job]:
        return [("POST", "/predict?top_k=1", self.pngs[i % len(self.pngs)], {"Content-Type": "image/png"},
                 int(self.top1[i % len(self.pngs)])) for i in range(n)]

    def v2_jobs(self, n: int) -> list[Job]:
        return [("POST", "/v2/models/r56/infer", self.v2_bodies[i % len(self.v2_bodies)], self.v2_headers,
                 int(self.top1[i % len(self.pngs)])) for i in range(n)]


def measure(port: int, server: subprocess.Popen, work: list[Job], concurrency: int) -> dict[str, float]:
    """Throughput, latency, wrong answers, mean batch and server CPU per request of one load."""
    before, cpu, model0 = scrape(port), tree_cpu_s(server.pid), model_threads_cpu_s(server.pid)
    seconds, latencies, results = asyncio.run(load(port, work, concurrency))
    used, after, model1 = tree_cpu_s(server.pid) - cpu, scrape(port), model_threads_cpu_s(server.pid)
    images = after["nv_inference_count"] - before["nv_inference_count"]
    execs = max(1.0, after["nv_inference_exec_count"] - before["nv_inference_exec_count"])
    mean_batch = images / execs if images else 1.0
    outside = used - (model1 - model0)
    return {"ips": len(work) / seconds, "p50": pct(latencies, 50), "p99": pct(latencies, 99),
            "wrong": sum(1 for s, b, e in results if s != 200 or top1(b) != e), "batch": mean_batch,
            "cpu_us": 1e6 * used / len(work), "outside_us": 1e6 * outside / len(work),
            "model_us": 1e6 * (model1 - model0) / len(work)}


def run_table(args: argparse.Namespace, work: Workload) -> dict[tuple[int, int, bool], dict[str, Any]]:
    """One server per row (workers, max batch, shared runner): its figures, printed as a Markdown row."""
    runs = [(w, 32, False) for w in args.workers] + [(args.workers[-1], 1, False)]
    if args.workers[-1] > 1 and not args.no_alternative and not args.cuda:  # a GPU is always shared
        runs.append((args.workers[-1], 32, True))
    table: dict[tuple[int, int, bool], dict[str, Any]] = {}
    c, best = args.concurrency, work.base["best_ips"]
    print(f"\n| workers | arrangement | PNG /predict c={c} img/s (x offline best) | binary v2 c={c} img/s "
          "(x) | mean batch | c=1 p50 ms | server CPU per PNG request: all / model / outside the model |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for workers, max_batch, shared in runs:
        port = free_port()
        server = start_server(work.served, port, max_batch, workers, shared, args.device_flags)
        try:
            asyncio.run(load(port, work.jobs(200), c))  # warm connections and caches
            asyncio.run(load(port, work.v2_jobs(100), c))
            png = measure(port, server, work.jobs(args.requests), c)
            v2 = measure(port, server, work.v2_jobs(args.requests), c)
            c1 = measure(port, server, work.jobs(300), 1) if max_batch > 1 else None
            table[(workers, max_batch, shared)] = {"png": png, "v2": v2, **({"c1": c1} if c1 else {})}
            mode = ("one process" if workers == 1 else "one inference process (--shared-runner)" if shared
                    else "one inference process (default)" if args.cuda else "a model per worker (default)")
            mode += "" if max_batch > 1 else ", batching off"
            print(f"| {workers} | {mode} | {png['ips']:.0f} ({png['ips'] / best:.2f}x) | "
                  f"{v2['ips']:.0f} ({v2['ips'] / best:.2f}x) | {png['batch']:.1f} | "
                  + (f"{c1['p50']:.2f}" if c1 else "-")
                  + f" | {png['cpu_us']:.0f} / {png['model_us']:.0f} / {png['outside_us']:.0f} µs |"
                  + (f" WRONG {png['wrong'] + v2['wrong']}" if png["wrong"] + v2["wrong"] else ""),
                  flush=True)
            if args.load_test and max_batch == 32 and not shared and workers == args.workers[-1]:
                load_test(port, server, work.jobs, work.pngs[0], args.load_rounds, args.load_good,
                          args.load_bad)
        finally:
            code = stop_server(server)
            if code != 0:
                print(f"  server exit code {code}")
    return table


def print_ratios(args: argparse.Namespace, work: Workload, table: dict[tuple[int, int, bool], Any]) -> None:
    top, off = table[(args.workers[-1], 32, False)], table[(args.workers[-1], 1, False)]
    best, c = work.base["best_ips"], args.concurrency
    if args.cuda:
        print(f"\nPNG /predict at c={c} on the GPU: {top['png']['ips']:.0f} img/s (issue 11's "
              f"target on an H100: >= 10,000 at c=64)")
    print(f"\nratios at --workers {args.workers[-1]}: PNG /predict c={c} / offline best = "
          f"{top['png']['ips'] / best:.2f} (target >= 0.8); binary v2 c={c} / offline best = "
          f"{top['v2']['ips'] / best:.2f} (target >= 0.9); batching on / off = "
          f"{top['png']['ips'] / off['png']['ips']:.2f} (target > 1); c=1 p50 - Runner batch-1 = "
          f"{top['c1']['p50'] - work.base['batch1_p50_ms']:+.2f} ms (target <= +2); server CPU per PNG "
          f"request outside the model = {top['png']['outside_us']:.0f} µs (target <= 250)")
    if (args.workers[-1], 32, True) in table:
        alt = table[(args.workers[-1], 32, True)]
        print(f"a model per worker / one shared inference process at --workers {args.workers[-1]}: PNG "
              f"{top['png']['ips'] / alt['png']['ips']:.2f}x, "
              f"binary v2 {top['v2']['ips'] / alt['v2']['ips']:.2f}x")


def main() -> None:
    """Phases: arguments -> the workload and its offline baseline -> one server per table row -> ratios."""
    args = parse_args()
    with contextlib.suppress(ImportError):  # uvloop is optional: a faster client loop where installed
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    work = Workload(args)
    print(f"machine: {os.cpu_count()} logical CPUs shared by client, server and (here) other work; "
          f"load average {os.getloadavg()[0]:.1f}")
    base = work.base
    print(f"offline Runner ({work.backend}, ResNet-56 random weights): "
          + ", ".join(f"b{b}={v:.0f}" for b, v in base["per_batch"].items())
          + f" img/s; best {base['best_ips']:.0f} img/s; batch-1 p50 {base['batch1_p50_ms']:.2f} ms")
    print_ratios(args, work, run_table(args, work))


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
