"""Small helpers shared by the bench scripts: timing, the CPU name, a served model's readiness (not part of
the installed package)."""

from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def wall_times(command: Sequence[str], repeat: int = 7, warmup: int = 1) -> list[float]:
    """Wall seconds of a whole process, `repeat` times after `warmup` runs (page cache warm)."""
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def call_times(func: Callable[[], object], repeat: int = 20, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def python() -> str:
    return sys.executable


def cpu_model() -> str:
    """The CPU's model name, printed with every figure: speeds compare only on the same kind of CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def wait_until_ready(process: subprocess.Popen, port: int, timeout_s: float) -> subprocess.Popen:
    """Poll `toolkit serve`'s readiness on loopback; a server that exits or never gets ready is an error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode() if process.stderr else "server died")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not become ready")
