"""Triton's own load generator, `perf_analyzer`, against a real `toolkit serve`, beside the built-in client.

perf_analyzer is what Triton users measure servers with; running it here shows that the server
speaks the protocol the way Triton does (random-byte inputs with NaN/Inf in them, system shared
memory, gRPC) and gives figures comparable with a Triton deployment of the same model.

Set-up (once, never part of `make test`): the registry's `perf-analyzer` package is a placeholder;
the real binary ships inside the Linux `tritonclient` wheels, and 2.51.0's is the newest that runs
on glibc 2.36. `--setup` (run automatically when the binary is missing) downloads that wheel with
pip (no install: the venv's tritonclient is untouched), extracts `perf_analyzer` into bench/.tools/
(ignored by git), installs `nvidia-cuda-runtime-cu12` (libcudart, which the binary links even on
CPU) into bench/.tools/cuda, and installs libb64-0d with apt-get when it is missing.

Runs, for each of HTTP and gRPC, batch 1 and 8, concurrency 1..32, with `--input-data random` and
`--shared-memory system` (plus the default data), and prints perf_analyzer's throughput and p50/p99
latency beside the built-in lean asyncio client (bench/bench_serve.py) sending the same v2 binary
requests over HTTP at the same concurrency. Client and server share this machine's cores.

    python bench/bench_perf_analyzer.py [--onnx model.onnx] [--concurrency 1,4,16,32] [--batch 1,8]
                                        [--interval-ms 2000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _timing import cpu_model, wait_until_ready  # noqa: E402 - bench/ is put on the path just above

TOOLS = ROOT / "bench" / ".tools"
BINARY = TOOLS / "perf_analyzer"
CUDA_LIB = TOOLS / "cuda" / "nvidia" / "cuda_runtime" / "lib"
WHEEL_VERSION = "2.51.0"  # newer wheels' binary needs glibc 2.38
MEMBER = f"tritonclient-{WHEEL_VERSION}.data/data/bin/perf_analyzer"
MODEL = "bench"


# --- set-up ----------------------------------------------------------------------------------------------

def setup() -> Path:
    """perf_analyzer and its libraries under bench/.tools/; returns the binary."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if not BINARY.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([*pip, "download", "-q", "--no-deps", f"tritonclient=={WHEEL_VERSION}",
                            "--platform", "manylinux1_x86_64", "--only-binary=:all:", "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("tritonclient-*.whl"))
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(BINARY, "wb") as dst:
                shutil.copyfileobj(src, dst)
        BINARY.chmod(0o755)
    if not (CUDA_LIB / "libcudart.so.12").exists():
        subprocess.run([*pip, "install", "-q", "--target", str(TOOLS / "cuda"), "nvidia-cuda-runtime-cu12"],
                       check=True)
    if not any(next(Path(d).glob("libb64.so.0d*"), None) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")):
        root = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*root, "apt-get", "update", "-qq"], check=True, env=env)  # a fresh machine: no lists
        subprocess.run([*root, "apt-get", "install", "-y", "-qq", "libb64-0d"], check=True, env=env)
    return BINARY


# --- perf_analyzer ---------------------------------------------------------------------------------------

def perf_analyzer(url: str, protocol: str, batch: int, concurrency: int, data: str | None,
                  shm: bool, interval_ms: int) -> dict[str, float]:
    """One perf_analyzer run at one concurrency -> {throughput, p50_ms, p99_ms}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        command = [str(BINARY), "-m", MODEL, "-u", url, "-i", protocol, "-b", str(batch),
                   "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval",
                   str(interval_ms), "-s", "50", "--max-trials", "20", "--percentile", "99",
                   "-f", str(report)]
        if data:
            command += ["--input-data", data]
        if shm:  # regions for inputs and outputs (perf_analyzer's default output size: 100 KiB)
            command += ["--shared-memory", "system"]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{CUDA_LIB}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 or not report.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise RuntimeError(f"perf_analyzer failed ({' '.join(command[1:])}): {' | '.join(tail)}")
        row = next(csv.DictReader(io.StringIO(report.read_text())))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}


# --- the built-in client (bench_serve's lean asyncio HTTP client), same requests -------------------------

def builtin(port: int, batch: int, concurrency: int, seconds: float) -> dict[str, float]:
    from bench_serve import load

    from toolkit.v2 import Tensor, encode_request

    raw = np.random.default_rng(0).integers(0, 256, size=batch * 3 * 32 * 32 * 4, dtype=np.uint8)
    body, length = encode_request([Tensor("input", raw.view(np.float32).reshape(batch, 3, 32, 32))])
    headers = {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}
    job = ("POST", f"/v2/models/{MODEL}/infer", body, headers, None)
    asyncio.run(load(port, [job] * (concurrency * 4), concurrency))  # warm-up
    count = max(concurrency * 8, 64)
    elapsed, latencies, results = asyncio.run(load(port, [job] * count, concurrency))
    while elapsed < seconds and count < 100_000:
        count = int(count * max(2.0, 1.2 * seconds / max(elapsed, 1e-3)))
        elapsed, latencies, results = asyncio.run(load(port, [job] * count, concurrency))
    bad = [status for status, _, _ in results if status != 200]
    if bad:
        raise RuntimeError(f"built-in client: {len(bad)} of {len(results)} requests failed (status {bad[0]})")
    latencies.sort()
    return {"throughput": batch * len(results) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


# --- the server ------------------------------------------------------------------------------------------

def start_server(onnx: Path, port: int, grpc_port: int) -> subprocess.Popen:

    command = [sys.executable, "-m", "toolkit.cli", "serve", "-m", str(onnx), "--name", MODEL,
               "--port", str(port), "--grpc-port", str(grpc_port), "--max-batch-size", "32",
               "--max-queue", "512"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_until_ready(process, port, timeout_s=120)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="model to serve (default: bench_serve's random ResNet-56)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrencies")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--quick", action="store_true", help="batch 1, concurrency 1 and 16 only")
    parser.add_argument("--setup", action="store_true", help="only install perf_analyzer into bench/.tools")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    setup()
    if args.setup:
        print(f"perf_analyzer {WHEEL_VERSION}: {BINARY}")
        return
    from bench_serve import build_resnet56, free_port, stop_server

    concurrencies = [1, 16] if args.quick else [int(c) for c in args.concurrency.split(",")]
    batches = [1] if args.quick else [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        onnx = args.onnx or build_resnet56(Path(tmp) / "resnet56.onnx")
        port, grpc_port = free_port(), free_port()
        server = start_server(onnx, port, grpc_port)
        rows = []
        try:
            print(f"{onnx.name} on {cpu_model()} ({os.cpu_count()} cores), perf_analyzer {WHEEL_VERSION}, "
                  f"interval {args.interval_ms} ms; infer/s, p50/p99 ms")
            print(f"{'client':<34}{'batch':>6}{'conc':>6}{'infer/s':>10}{'p50':>9}{'p99':>9}")
            variants = [("http", None, False), ("http", "random", False), ("http", "random", True),
                        ("grpc", "random", False), ("grpc", "random", True)]
            for batch in batches:
                for concurrency in concurrencies:
                    for protocol, data, shm in variants:
                        url = f"127.0.0.1:{grpc_port if protocol == 'grpc' else port}"
                        label = f"perf_analyzer {protocol} {data or 'default'}{' shm' if shm else ''}"
                        figures = perf_analyzer(url, protocol, batch, concurrency, data, shm,
                                                args.interval_ms)
                        rows.append({"client": label, "batch": batch, "concurrency": concurrency, **figures})
                    figures = builtin(port, batch, concurrency, args.interval_ms / 1000)
                    rows.append({"client": "built-in (bench_serve) http", "batch": batch,
                                 "concurrency": concurrency, **figures})
                    for row in rows[-len(variants) - 1:]:
                        print(f"{row['client']:<34}{batch:>6}{concurrency:>6}{row['throughput']:>10.1f}"
                              f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}", flush=True)
        finally:
            stop_server(server)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
