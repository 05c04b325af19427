"""`toolkit benchmark`: one checkpoint across formats and precisions, accuracy and speed in one table.

Each row is made the way a user would make it (`export.pipeline.run_export`: export + parity check
against eager PyTorch), then evaluated with the same `toolkit.evaluate.evaluate` loop as
`toolkit eval`, then timed: latency at batch 1 (p50/p99) and throughput at each requested batch
size (the best one is reported). OpenVINO rows run the ONNX files the ONNX rows wrote. A row that
fails records its error and the others still run. This lives in `export/` because it exports;
`toolkit/` never imports it (the CLI does, inside the command).

`runner_options` (the CLI's `--precision`) are the torch and TorchScript runners' own options:
with `precision` bf16, say, those rows compute in bf16 (weights cast once; TorchScript's fp32
archive through autocast) and are labelled so, while the torch fp32 row stays first as the
reference that agreement, speed-up and McNemar's p are measured against.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.data import Dataset, load_dataset
from toolkit.errors import ToolkitError, UsageError, first_line
from toolkit.evaluate import align_dataset, evaluate
from toolkit.names import ONNX_PRECISIONS, RUN_PRECISIONS
from toolkit.runtime.base import Runner

if TYPE_CHECKING:  # pragma: no cover
    from toolkit.card_layers import CardFlags

FORMATS = ("torch", "torchscript", "onnx", "openvino", "tensorrt", "pt2", "aoti")
PRECISIONS = ONNX_PRECISIONS  # of the exported ONNX files (--precisions)
# rows whose runner computes at a precision of its own choosing (--precision), from an fp32 artifact
RUN_BACKENDS = ("torch", "torchscript")


@dataclass(frozen=True)
class Variant:
    """One row: an artifact format, its precision, and the runtime that runs it."""

    format: str
    precision: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


PLAN = (
    Variant("torch", "fp32", "torch"),
    Variant("torchscript", "fp32", "torchscript"),
    Variant("onnx", "fp32", "onnxruntime"),
    Variant("onnx", "fp16", "onnxruntime"),
    Variant("onnx", "int8", "onnxruntime"),
    Variant("openvino", "fp32", "openvino"),
    Variant("openvino", "int8", "openvino"),
    Variant("tensorrt", "fp32", "tensorrt"),
    Variant("tensorrt", "fp16", "tensorrt"),
    Variant("tensorrt", "int8", "tensorrt"),
    Variant("pt2", "fp32", "pt2"),
    Variant("aoti", "fp32", "aoti"),
)


def plan(formats: Sequence[str] | None, precisions: Sequence[str] | None,
         run_precision: str | None = None) -> list[Variant]:
    """The rows to run: torch eager fp32 always first (the reference for agreement and speed-up).

    `precisions` chooses the exported artifacts' precisions; `run_precision` (`--precision`) is the
    compute precision of the torch and TorchScript rows, which --formats alone then chooses."""
    for name in formats or ():
        if name not in FORMATS:
            raise UsageError(f"unknown format {name!r} for --formats; choose from {', '.join(FORMATS)}")
    for name in precisions or ():
        if name not in PRECISIONS:
            raise UsageError(f"unknown precision {name!r} for --precisions; "
                             f"choose from {', '.join(PRECISIONS)}")
    chosen = [v for v in PLAN
              if (not formats or v.format in formats) and (not precisions or v.precision in precisions)]
    if run_precision is not None:
        if run_precision not in RUN_PRECISIONS:
            raise UsageError(f"unknown precision {run_precision!r} for --precision; "
                             f"choose from {', '.join(RUN_PRECISIONS)}")
        runs = [replace(v, precision=run_precision) for v in PLAN
                if v.backend in RUN_BACKENDS and (not formats or v.format in formats)]
        if not runs:
            raise UsageError("--precision sets the compute precision of the torch and torchscript rows; "
                             "add one of them to --formats (--precisions chooses the exported files')")
        chosen = runs + [v for v in chosen if v.backend not in RUN_BACKENDS]
    return [PLAN[0], *[v for v in chosen if v != PLAN[0]]]


def _without_unusable_tensorrt(variants: list[Variant], device: str) -> list[Variant]:
    """Without a GPU, the TensorRT rows collapse into one skipped row that says why."""
    if device.startswith("cuda"):
        return variants
    trt = [v for v in variants if v.backend == "tensorrt"]
    rest = [v for v in variants if v.backend != "tensorrt"]
    return rest + trt[-1:]


# --- timing ------------------------------------------------------------------------------------

def latency_ms(runner: Runner, image: np.ndarray, runs: int = 30, warmup: int = 3) -> tuple[float, float]:
    """p50 and p99 of single-image calls, in milliseconds."""
    for _ in range(warmup):
        runner(image)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        runner(image)
        times.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(runner: Runner, images: np.ndarray, batch_sizes: Sequence[int], min_seconds: float = 0.5,
               max_rounds: int = 50) -> dict[int, float]:
    """Model-only images/s per batch size on preprocessed images (repeated to fill large batches)."""
    results = {}
    for size in batch_sizes:
        reps = -(-size // len(images))
        batch = np.ascontiguousarray(np.concatenate([images] * reps)[:size])
        runner(batch)  # warm-up: first calls allocate and pick kernels
        done, began = 0, time.perf_counter()
        for _ in range(max_rounds):
            runner(batch)
            done += size
            if time.perf_counter() - began >= min_seconds:
                break
        results[size] = done / (time.perf_counter() - began)
    return results


# --- rows --------------------------------------------------------------------------------------

class _Artifacts:
    """Exports each (format, precision) once; OpenVINO rows reuse the ONNX files."""

    def __init__(self, checkpoint: str, folder: Path, dataset: str, data_dir: Path | None, *, device: str,
                 allow_pickle: bool, calib_size: int, verify_samples: int,
                 card_flags: CardFlags | Mapping[str, Any] | None = None) -> None:
        self.checkpoint, self.folder, self.dataset, self.data_dir = checkpoint, folder, dataset, data_dir
        self.device, self.allow_pickle, self.card_flags = device, allow_pickle, card_flags
        self.calib_size, self.verify_samples = calib_size, verify_samples
        self.made: dict[tuple[str, str], Any] = {}

    def get(self, fmt: str, precision: str) -> Any:
        from .pipeline import default_output, run_export

        key = (fmt, precision)
        if key not in self.made:
            output = self.folder / default_output(self.checkpoint, fmt, precision).name
            if fmt == "tensorrt":
                output = output.with_suffix(".engine")
            self.made[key] = run_export(
                self.checkpoint, fmt, output, precision=precision, device=self.device,
                calib_dataset=self.dataset if precision == "int8" else None, data_dir=self.data_dir,
                calib_size=self.calib_size, verify_dataset=self.dataset, verify_samples=self.verify_samples,
                allow_pickle=self.allow_pickle, card_flags=self.card_flags,
            )
        return self.made[key]


def _open(variant: Variant, checkpoint: str, artifacts: _Artifacts, device: str, allow_pickle: bool,
          runner_options: dict[str, Any] | None = None) -> tuple[Runner, Any]:
    """The row's runner (and its export result). The torch and TorchScript rows other than the fp32
    reference get `runner_options` at the row's precision, and run the fp32 artifact; the torch rows
    open the checkpoint with the card flags the artifacts were exported with."""
    from toolkit.runtime.registry import open_model

    options: dict[str, Any] = {}
    if variant.backend in RUN_BACKENDS and variant != PLAN[0]:
        options = {**(runner_options or {}), "precision": variant.precision}
    if variant.format == "torch":
        options.update(_torch_options(allow_pickle, artifacts.card_flags))
        return open_model(checkpoint, backend="torch", device=device, **options), None
    if variant.backend == "tensorrt" and not device.startswith("cuda"):
        raise UsageError("TensorRT needs --device cuda and a GPU with TensorRT installed")
    source = "onnx" if variant.format == "openvino" else variant.format
    result = artifacts.get(source, "fp32" if variant.backend in RUN_BACKENDS else variant.precision)
    return open_model(result.path, backend=variant.backend, device=device, **options), result


def _row(variant: Variant, checkpoint: str, artifacts: _Artifacts, data: Dataset, timing_images: np.ndarray,
         batch_sizes: Sequence[int], device: str, allow_pickle: bool, reference: dict[str, Any] | None,
         latency_runs: int, min_seconds: float,
         runner_options: dict[str, Any] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": variant.label, "format": variant.format, "precision": variant.precision,
                           "backend": variant.backend, "status": "ok", "error": None}
    started = time.perf_counter()
    try:
        runner, export = _open(variant, checkpoint, artifacts, device, allow_pickle, runner_options)
        if export is not None:
            row.update(file=str(export.path), size_bytes=export.size_bytes, export_seconds=export.seconds)
            if export.verify is not None:
                row["verify"] = export.verify.summary()
                row["max_abs_diff"] = export.verify.max_abs_diff
                if not export.verify.passed:
                    row["status"] = "failed-verify"
                    row["error"] = "; ".join(export.verify.failures)
        else:
            path = Path(checkpoint)
            row.update(file=str(path), size_bytes=path.stat().st_size if path.is_file() else None)
        with runner:
            report = evaluate(runner, data, batch_size=max(batch_sizes))
            metrics = report.to_dict()
            row.update(accuracy=metrics["accuracy"], top5=metrics["top5"], macro_f1=metrics["macro"]["f1"],
                       eval_images_per_second=report.images_per_second, predictions=report.predictions)
            p50, p99 = latency_ms(runner, timing_images[:1], runs=latency_runs)
            speeds = throughput(runner, timing_images, batch_sizes, min_seconds=min_seconds)
        best = max(speeds, key=lambda size: speeds[size])
        row.update(latency_ms_p50=p50, latency_ms_p99=p99, throughput=speeds[best], best_batch_size=best,
                   throughput_by_batch={str(k): v for k, v in speeds.items()})
        if reference is not None:
            row["agreement"] = float((row["predictions"] == reference["predictions"]).mean())
            base = reference.get("throughput")
            row["speedup"] = row["throughput"] / base if base else None
            # McNemar's exact test: is the accuracy gap to the fp32 reference more than noise?
            from toolkit.compare import mcnemar_exact

            row["mcnemar_p"] = mcnemar_exact(reference["predictions"] == report.labels,
                                             row["predictions"] == report.labels).p_value
        else:
            row["agreement"], row["speedup"], row["mcnemar_p"] = 1.0, 1.0, None
    except (ToolkitError, Exception) as exc:  # noqa: BLE001 - one failing row must not stop the others
        skipped = isinstance(exc, UsageError) and variant.backend == "tensorrt"
        row["status"] = "skipped" if skipped else "failed"
        row["error"] = first_line(exc, 300)
    row["seconds"] = time.perf_counter() - started
    return row


def run_benchmark(checkpoint: str | Path, *, formats: Sequence[str] | None = None,
                  precisions: Sequence[str] | None = None, dataset: str = "sample",
                  data_dir: str | Path | None = None,
                  split: str = "test", limit: int | None = None, batch_sizes: Sequence[int] = (32, 128),
                  device: str = "cpu", output_dir: str | Path | None = None, allow_pickle: bool = False,
                  progress: bool = False, latency_runs: int = 30, min_seconds: float = 0.5,
                  calib_size: int = 512, verify_samples: int = 512,
                  runner_options: dict[str, Any] | None = None,
                  card_flags: CardFlags | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every row of the table as a dict, plus what was measured on; writes JSON + chart to output_dir.

    `runner_options`: the torch and TorchScript runners' options (`precision`: their rows' compute
    precision); the torch fp32 reference row runs without them. `card_flags` override card fields of
    the checkpoint in every row (its torch runners and every export)."""
    from toolkit.runtime.registry import require_checkpoint

    checkpoint = require_checkpoint(checkpoint, doing="benchmark")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    variants = _without_unusable_tensorrt(plan(formats, precisions, (runner_options or {}).get("precision")),
                                          device)
    data = load_dataset(dataset, data_dir, split).subset(limit)
    keep = output_dir is not None
    folder = Path(output_dir if output_dir is not None else tempfile.mkdtemp(prefix="toolkit-benchmark-"))
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = _Artifacts(str(checkpoint), folder, dataset, Path(data_dir) if data_dir else None,
                           device=device, allow_pickle=allow_pickle, calib_size=calib_size,
                           verify_samples=min(verify_samples, len(data)), card_flags=card_flags)
    log = _logger(progress)
    rows: list[dict[str, Any]] = []
    try:
        reference: dict[str, Any] | None = None
        timing_images: np.ndarray | None = None
        for variant in variants:
            log(f"{variant.label}: exporting, verifying, evaluating, timing…")
            if timing_images is None:
                timing_images = _timing_images(checkpoint, data, _torch_options(allow_pickle, card_flags))
            row = _row(variant, str(checkpoint), artifacts, data, timing_images, batch_sizes, device,
                       allow_pickle, reference, latency_runs, min_seconds, runner_options)
            if variant == PLAN[0]:
                if row["status"] != "ok":
                    raise ToolkitError(f"the PyTorch reference itself failed: {row['error']}")
                reference = row
            log(f"{variant.label}: {row['status']}" + (f" ({row['error']})" if row["error"] else ""))
            rows.append(row)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        row.pop("predictions", None)
        if not keep:
            row.pop("file", None)
    result: dict[str, Any] = {"model": str(checkpoint), "dataset": data.name, "sampling": data.sampling,
                              "num_samples": len(data), "device": device, "batch_sizes": list(batch_sizes),
                              "rows": rows, "recommendation": recommendation(rows, device)}
    if keep:
        from toolkit.fileio import atomic_write_text

        atomic_write_text(folder / "benchmark.json", json.dumps(result, indent=2) + "\n")
        chart = plot_benchmark(rows, folder / "benchmark.png")
        result["files"] = [str(folder / "benchmark.json")] + ([str(chart)] if chart else [])
    return result


def _torch_options(allow_pickle: bool, card_flags: CardFlags | Mapping[str, Any] | None) -> dict[str, Any]:
    """The options every open of the checkpoint's torch runner takes (TorchRunner.open)."""
    options: dict[str, Any] = {"allow_pickle": True} if allow_pickle else {}
    if card_flags:
        options["card_flags"] = card_flags
    return options


def _timing_images(checkpoint: str | Path, data: Dataset, options: dict[str, Any]) -> np.ndarray:
    """A few real preprocessed images (the card's preprocessing) to time with."""
    from toolkit.runtime.registry import open_model

    with open_model(checkpoint, backend="torch", **options) as runner:
        card = runner.card
    sample = align_dataset(data, card).subset(min(len(data), 64))
    return np.concatenate(list(sample.batches(card, 64)))


def _logger(enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return lambda message: None
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    return lambda message: console.print(f"[dim]{escape(message)}[/]")


def plot_benchmark(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy vs throughput, one labelled point per successful row (log-scale throughput)."""
    from toolkit.report import _matplotlib, save_figure

    plt = _matplotlib()
    if plt is None:
        return None
    done = [r for r in rows if r.get("throughput") and r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in done:
        ax.scatter(row["throughput"], 100 * row["accuracy"], s=40)
        ax.annotate(row["name"], (row["throughput"], 100 * row["accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if done:
        ax.set_xscale("log")
    ax.set_xlabel("throughput at best batch size (images/s, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs throughput")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


# --- the recommendation line ---------------------------------------------------------------------

PATHS = {"torch": "eager PyTorch", "torchscript": "TorchScript", "onnxruntime": "ONNX Runtime",
         "openvino": "OpenVINO", "tensorrt": "TensorRT", "pt2": "torch.export program",
         "aoti": "AOTInductor package"}


def recommendation(rows: Sequence[dict[str, Any]], device: str) -> str | None:
    """The fastest row that passed its checks without a significant accuracy loss (McNemar's p < 0.05
    with a lower accuracy than the fp32 reference), named as a path a user would choose."""
    if not rows:
        return None
    reference = rows[0].get("accuracy") or 0.0

    def usable(row: dict[str, Any]) -> bool:
        worse = (row.get("mcnemar_p") or 1.0) < 0.05 and (row.get("accuracy") or 0.0) < reference
        return row["status"] == "ok" and bool(row.get("throughput")) and not worse

    candidates = [row for row in rows if usable(row)]
    if not candidates:
        return None
    best = max(candidates, key=lambda row: row["throughput"])
    kind = "GPU" if device.startswith("cuda") else "CPU"
    return (f"fastest {kind} path here: {best['name']} ({PATHS.get(best['backend'], best['backend'])}), "
            f"{best['throughput']:,.0f} img/s at batch {best['best_batch_size']}, "
            f"{best.get('speedup') or 1.0:.2f}x torch eager fp32, accuracy not significantly lower")

