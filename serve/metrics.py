"""Request and batch statistics with Triton's meanings, rendered as Prometheus text and v2 stats JSON.

Names follow Triton's `nv_inference_*` metrics, one sample per loaded model version with Triton's
`model` and `version` labels: durations are cumulative microseconds over successful requests; a
request in a batch of k is charged the whole batch's compute time (as Triton does);
`nv_inference_count` counts images, `nv_inference_exec_count` runner calls. Besides the models the
server counts its own (`ServerCounters`): requests in flight, HTTP responses, worker processes.

The text format is written here, not by prometheus_client: its exposition appends `_total` to every
counter (`nv_inference_request_success_total`), which would rename Triton's metrics under dashboards
built for Triton; and its multi-process mode writes a memory-mapped file on every increment, where
these counters are plain integers merged over the processes' own channel when scraped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass
class RequestTiming:
    """Per-request phases, in seconds (filled along the way)."""

    input_s: float = 0.0  # decode + preprocess (compute_input)
    queue_s: float = 0.0  # waiting for the runner
    infer_s: float = 0.0  # the runner call of its batch (compute_infer)
    output_s: float = 0.0  # softmax/top-k/encoding (compute_output)
    batch_size: int = 0  # images in the runner call this request rode in (set by the batcher)


@dataclass
class Stats:
    """Thread-safe counters of one loaded model version (each process counts its share)."""

    success: int = 0
    success_us: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    failure_us: float = 0.0
    queue_us: float = 0.0
    input_us: float = 0.0
    infer_us: float = 0.0
    output_us: float = 0.0
    inference_count: int = 0  # images run
    exec_count: int = 0  # runner calls
    batch_sizes: Counter[int] = field(default_factory=Counter)  # images per runner call -> calls
    batch_infer_us: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    # per batch size: the summed compute_input/compute_output of the requests that rode in such calls
    batch_input_us: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    batch_output_us: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    pending: int = 0  # requests queued, not yet running
    last_inference_ms: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- merging across processes (serve.workers: each process counts its share) ---------------

    def snapshot(self) -> dict[str, object]:
        """Plain picklable copy of the counters, for `merged`."""
        with self._lock:
            data: dict[str, object] = {name: getattr(self, name) for name in _SUMS}
            data.update({name: dict(getattr(self, name)) for name in _MAPS})
            data["last_inference_ms"] = self.last_inference_ms
            return data

    @classmethod
    def merged(cls, snapshots: list[dict[str, object]]) -> Stats:
        """One Stats summing several processes' snapshots (sums add, the last inference is the latest)."""
        total = cls()
        for snap in snapshots:
            for name in _SUMS:
                setattr(total, name, getattr(total, name) + snap.get(name, 0))  # type: ignore[operator]
            for name in _MAPS:
                counts = getattr(total, name)
                for key, value in snap.get(name, {}).items():  # type: ignore[attr-defined]
                    counts[key] += value
            last = int(snap.get("last_inference_ms", 0))  # type: ignore[call-overload]
            total.last_inference_ms = max(total.last_inference_ms, last)
        return total

    def record_success(self, total_s: float, timing: RequestTiming) -> None:
        with self._lock:
            self.success += 1
            self.success_us += total_s * 1e6
            self.queue_us += timing.queue_s * 1e6
            self.input_us += timing.input_s * 1e6
            self.infer_us += timing.infer_s * 1e6
            self.output_us += timing.output_s * 1e6
            if timing.batch_size:
                self.batch_input_us[timing.batch_size] += timing.input_s * 1e6
                self.batch_output_us[timing.batch_size] += timing.output_s * 1e6
            self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, reason: str, total_s: float) -> None:
        with self._lock:
            self.failures[reason if reason in FAILURE_REASONS else "OTHER"] += 1
            self.failure_us += total_s * 1e6

    def record_batch(self, size: int, infer_s: float) -> None:
        with self._lock:
            self.exec_count += 1
            self.inference_count += size
            self.batch_sizes[size] += 1
            self.batch_infer_us[size] += infer_s * 1e6

    def v2_statistics(self, model: str, version: str,
                      memory_usage: list[dict[str, object]] | None = None) -> dict[str, Any]:
        """The KServe/Triton statistics extension document (`GET /v2/models/{name}/stats`).

        Per batch size, compute_input/compute_output are the summed phases of the requests that
        rode in runner calls of that size. Every response is the first of its request (no
        decoupled models), so `response_stats` has the one key "0", as Triton reports it."""

        def stat(count: int, micros: float) -> dict[str, int]:
            return {"count": int(count), "ns": int(micros * 1000)}

        with self._lock:
            batch_stats = [{"batch_size": size, "compute_infer": stat(n, self.batch_infer_us[size]),
                            "compute_input": stat(n, self.batch_input_us[size]),
                            "compute_output": stat(n, self.batch_output_us[size])}
                           for size, n in sorted(self.batch_sizes.items())]
            failed = sum(self.failures.values())
            responses = {"0": {"compute_infer": stat(self.success, self.infer_us),
                               "compute_output": stat(self.success, self.output_us),
                               "success": stat(self.success, self.success_us),
                               "fail": stat(failed, self.failure_us),
                               "empty_response": stat(0, 0),
                               "cancel": stat(self.failures.get("CANCELED", 0), 0)}
                         } if self.success or failed else {}
            return {"model_stats": [{
                "name": model, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.exec_count,
                "inference_stats": {
                    "success": stat(self.success, self.success_us),
                    "fail": stat(sum(self.failures.values()), self.failure_us),
                    "queue": stat(self.success, self.queue_us),
                    "compute_input": stat(self.success, self.input_us),
                    "compute_infer": stat(self.success, self.infer_us),
                    "compute_output": stat(self.success, self.output_us),
                    "cache_hit": stat(0, 0), "cache_miss": stat(0, 0),
                },
                "batch_stats": batch_stats,
                "memory_usage": list(memory_usage or []),
                "response_stats": responses,
            }]}


_SUMS = ("success", "success_us", "failure_us", "queue_us", "input_us", "infer_us", "output_us",
         "inference_count", "exec_count", "pending")
_MAPS = ("failures", "batch_sizes", "batch_infer_us", "batch_input_us", "batch_output_us")


@dataclass
class ServerCounters:
    """What the server counts besides its models: requests in flight (what draining waits for), HTTP
    responses by status, and with worker processes, how many are connected and how many were replaced."""

    in_flight: int = 0
    http_responses: Counter[str] = field(default_factory=Counter)
    workers: int = 0
    worker_restarts: int = 0

    def record_http(self, status: int) -> None:
        self.http_responses[str(status)] += 1  # on the event loop only: no lock

    def snapshot(self) -> dict[str, object]:
        return {"in_flight": self.in_flight, "http_responses": dict(self.http_responses),
                "workers": self.workers, "worker_restarts": self.worker_restarts}

    @classmethod
    def merged(cls, snapshots: Sequence[dict[str, object]]) -> ServerCounters:
        total = cls()
        for snap in snapshots:
            total.in_flight += int(snap.get("in_flight", 0))  # type: ignore[call-overload]
            total.workers += int(snap.get("workers", 0))  # type: ignore[call-overload]
            total.worker_restarts += int(snap.get("worker_restarts", 0))  # type: ignore[call-overload]
            total.http_responses.update(snap.get("http_responses", {}))  # type: ignore[arg-type, call-overload]
        return total


# --- Prometheus text exposition (format 0.0.4) --------------------------------------------------------

Labelled = tuple[str, str, "Stats"]  # (model, version, its statistics)
_COUNTERS: tuple[tuple[str, str, Callable[[Stats], float]], ...] = (
    ("nv_inference_count", "Number of inferences performed (images; does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (runner calls)",
     lambda s: s.exec_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds "
     "(successful requests)", lambda s: s.success_us),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     lambda s: s.queue_us),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds "
     "(decode + preprocess)", lambda s: s.input_us),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     lambda s: s.infer_us),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in "
     "microseconds", lambda s: s.output_us),
)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def exposition(models: Sequence[Labelled], server: ServerCounters) -> str:
    """/metrics: every family once, a sample per model version (labels `model`, `version`)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}"
                     for labels, value in samples)

    labelled = [(f'model="{_escape(name)}",version="{_escape(version)}"', stats) for name, version, stats
                in models]
    family("nv_inference_request_success", "counter", "Number of successful inference requests, all batch "
           "sizes", [(labels, s.success) for labels, s in labelled])
    family("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes",
           [(f'{labels},reason="{reason}"', s.failures.get(reason, 0)) for labels, s in labelled
            for reason in FAILURE_REASONS])
    for name, help_text, value in _COUNTERS:
        family(name, "counter", help_text, [(labels, value(s)) for labels, s in labelled])
    family("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting "
           "execution", [(labels, s.pending) for labels, s in labelled])
    lines.extend(("# HELP toolkit_inference_batch_size Images per model execution",
                  "# TYPE toolkit_inference_batch_size histogram"))
    for labels, s in labelled:
        for bound in sorted({*BATCH_BOUNDS, *s.batch_sizes}):
            count = sum(c for size, c in s.batch_sizes.items() if size <= bound)
            lines.append(f'toolkit_inference_batch_size_bucket{{{labels},le="{bound}"}} {count}')
        lines += [f'toolkit_inference_batch_size_bucket{{{labels},le="+Inf"}} {s.exec_count}',
                  f"toolkit_inference_batch_size_sum{{{labels}}} {s.inference_count}",
                  f"toolkit_inference_batch_size_count{{{labels}}} {s.exec_count}"]
    family("toolkit_requests_in_flight", "gauge", "Requests being handled now", [("", server.in_flight)])
    family("toolkit_http_responses", "counter", "HTTP responses by status code",
           [(f'code="{code}"', n) for code, n in sorted(server.http_responses.items())])
    if server.workers:
        family("toolkit_workers", "gauge", "Front-end worker processes connected to the inference process",
               [("", server.workers)])
        family("toolkit_worker_restarts", "counter", "Front-end workers that died and were replaced",
               [("", server.worker_restarts)])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"
