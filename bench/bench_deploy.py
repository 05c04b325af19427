"""Every CPU deployment path on one model, in one run: model-only and end-to-end img/s, as ratios to ORT fp32.

Paths: eager PyTorch, TorchScript, torch.export (`.pt2` program), AOTInductor (`.pt2` package of
compiled kernels), ONNX Runtime and OpenVINO; each at fp32 and at the best reduced precision it
offers here: bf16 for the torch paths where the CPU has bf16 instructions (eager: weights cast;
TorchScript: its fp32 archive under autocast; torch.export and AOTInductor: bf16 artifacts behind fp32
edges), int8 (Q/DQ ONNX calibrated by export/quantize.py) for ONNX Runtime and OpenVINO.

Models (all generated, nothing downloaded; their weights are RANDOM, which is fine for speed):
- `resnet56`: CIFAR ResNet-56 (option A) at 32x32, BatchNorm statistics re-estimated on generated
  CIFAR-format images (bench_eval.make_resnet56); end-to-end = `evaluate` over those in-memory images;
- `resnet50`: torchvision ResNet-50 at 224 (ImageNet card: resize 256, centre crop 224), torchvision's
  initialisation; end-to-end = `evaluate` over a folder of real-photo JPEGs (100x100 crops made by
  bench_folder.write_jpeg_folder, resized to 256 and cropped to 224 by the card), decoding included.

model-only: the runner on one preprocessed batch, repeated; end-to-end: `toolkit.evaluate.evaluate`
(read, decode, preprocess, infer, metrics; its first batch is warm-up). Each row is opened alone and
closed after, so no other runtime's threads spin beside it; all rows run --rounds times, round after
round, and the best of each figure counts.
Artifacts are written with `export.pipeline.run_export` (verification off: speed is what is measured
here; `toolkit export` verifies every one of them). torch.export programs and AOTInductor packages
take batches up to --batch-size. Rows run one after another on a shared machine: compare ratios
within one run, and look at the load average printed with them.

    .venv/bin/python bench/bench_deploy.py [--models resnet56 resnet50] [--images N] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import cpu_model

BASELINE = ("ONNX Runtime", "fp32")
SUFFIXES = {"torchscript": ".ts", "pt2": ".pt2", "aoti": ".aoti.pt2", "onnx": ".onnx"}


@dataclass(frozen=True)
class Row:
    """One path at one precision: which artifact, which backend, which runner options."""

    path: str
    precision: str
    artifact: tuple[str, str]  # (export format or "checkpoint", its precision)
    backend: str
    options: tuple[tuple[str, Any], ...] = ()


def rows(reduced: str | None) -> list[Row]:
    """fp32 and the best reduced precision of each path (`reduced`: bf16 for the torch paths, or None)."""
    plan = [
        Row("eager", "fp32", ("checkpoint", "fp32"), "torch"),
        Row("TorchScript", "fp32", ("torchscript", "fp32"), "torchscript"),
        Row("torch.export", "fp32", ("pt2", "fp32"), "pt2"),
        Row("AOTInductor", "fp32", ("aoti", "fp32"), "aoti"),
        Row("ONNX Runtime", "fp32", ("onnx", "fp32"), "onnxruntime"),
        Row("OpenVINO", "fp32", ("onnx", "fp32"), "openvino"),
    ]
    if reduced is not None:
        plan += [
            Row("eager", reduced, ("checkpoint", "fp32"), "torch", (("precision", reduced),)),
            Row("TorchScript", reduced, ("torchscript", "fp32"), "torchscript", (("precision", reduced),)),
            Row("torch.export", reduced, ("pt2", reduced), "pt2"),
            Row("AOTInductor", reduced, ("aoti", reduced), "aoti"),
        ]
    plan += [Row("ONNX Runtime", "int8", ("onnx", "int8"), "onnxruntime"),
             Row("OpenVINO", "int8", ("onnx", "int8"), "openvino")]
    order = [r.path for r in plan[:6]]
    return sorted(plan, key=lambda r: (order.index(r.path), r.precision != "fp32"))


def torch_reduced_precision() -> str | None:
    """bf16 where this CPU computes it natively (AVX-512 BF16 or AMX), else None: emulated reduced
    precision is slower than fp32, so it is no path anyone would deploy."""
    import torch

    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


# --- models and data ------------------------------------------------------------------------------

def resnet56(root: Path, images: int) -> tuple[Path, Any]:
    """The CIFAR ResNet-56 checkpoint and its CIFAR-format test set (bench_eval builds both)."""
    from bench_eval import make_cifar, make_resnet56

    from toolkit.data import load_cifar

    make_cifar(root, max(images, 1024))  # 1,024 at least: BatchNorm statistics are re-estimated on them
    data = load_cifar(root, "cifar10", "test").subset(images)
    return make_resnet56(root, root), data


def resnet50(root: Path, images: int) -> tuple[Path, Any]:
    """A random torchvision ResNet-50 with the ImageNet card beside it, and a folder of 100x100 real-photo
    JPEGs (crops of scikit-learn's two 640x427 photographs; the card resizes them to 256, crops 224)."""
    import torch
    from bench_folder import write_jpeg_folder

    from toolkit.archs import build_model
    from toolkit.card import sidecar_path
    from toolkit.card_layers import resolve_card
    from toolkit.data import load_image_folder

    torch.manual_seed(0)
    card = resolve_card(arch="resnet50", num_classes=1000, stem="imagenet")
    path = root / "resnet50_random.pt"
    torch.save(build_model("resnet50", 1000).state_dict(), path)
    card.save(sidecar_path(path))
    folder = write_jpeg_folder(root / "jpegs", images, size=100, quality=90)
    # speed is what is measured: the folders' labels are renamed as (the first of) the model's classes
    data = load_image_folder(folder)
    return path, replace(data, class_names=card.class_names)


MODELS = {"resnet56": ("CIFAR ResNet-56, 32x32", resnet56, 1024),
          "resnet50": ("ResNet-50, 224x224", resnet50, 64)}


# --- artifacts and measurements -------------------------------------------------------------------

def build(checkpoint: Path, needed: set[tuple[str, str]], data: Any, batch_size: int,
          folder: Path) -> dict[tuple[str, str], tuple[Path, float]]:
    """Each artifact once: (path, seconds it took to write)."""
    from export.pipeline import run_export

    built: dict[tuple[str, str], tuple[Path, float]] = {("checkpoint", "fp32"): (checkpoint, 0.0)}
    for fmt, precision in sorted(needed - set(built)):
        began = time.perf_counter()
        options: dict[str, Any] = {"max_batch": batch_size} if fmt in ("pt2", "aoti") else {}
        if precision == "int8":
            options.update(calib_dataset=data, calib_size=min(len(data), 256))
        output = folder / f"{checkpoint.stem}.{precision}{SUFFIXES[fmt]}"
        result = run_export(checkpoint, fmt, output, precision=precision, do_verify=False, **options)
        built[(fmt, precision)] = (result.path, time.perf_counter() - began)
        print(f"  built {fmt} {precision} in {built[(fmt, precision)][1]:.1f} s", flush=True)
    return built


def timed(runner: Any, batch: Any, min_seconds: float) -> float:
    """Images/s of a warm runner on one ready batch, repeated for `min_seconds` (and at least once)."""
    done, began = 0, time.perf_counter()
    while not done or time.perf_counter() - began < min_seconds:
        runner(batch)
        done += len(batch)
    return done / (time.perf_counter() - began)


def measure_once(row: Row, artifact: Path, data: Any, batch_size: int,
                 min_seconds: float) -> dict[str, float]:
    """One row, opened alone (no other runtime's threads alive beside it) and closed after: model-only
    img/s on one preprocessed batch after a warm-up call, then end-to-end img/s."""
    from toolkit.evaluate import evaluate
    from toolkit.runtime.registry import open_model

    with open_model(artifact, backend=row.backend, **dict(row.options)) as runner:
        batch = next(data.batches(runner.card, batch_size))
        runner(batch)  # this shape's first call: kernels picked, memory grown
        alone = timed(runner, batch, min_seconds)
        report = evaluate(runner, data, batch_size=batch_size)
    return {"model": alone, "e2e": report.images_per_second}


def measure(plan: list[Row], built: dict[tuple[str, str], tuple[Path, float]], data: Any, batch_size: int,
            min_seconds: float, rounds: int) -> dict[Row, dict[str, float]]:
    """Every row `rounds` times, round after round; the best of each figure counts (others' jobs on a
    shared machine slow whichever row runs meanwhile: rounds spread that, the best drops it)."""
    results: dict[Row, dict[str, float]] = {row: {"model": 0.0, "e2e": 0.0} for row in plan}
    for number in range(1, rounds + 1):
        for row in plan:
            got = measure_once(row, built[row.artifact][0], data, batch_size, min_seconds)
            results[row] = {key: max(value, got[key]) for key, value in results[row].items()}
            print(f"  round {number}: {row.path} {row.precision}: model {got['model']:,.1f} img/s, "
                  f"end-to-end {got['e2e']:,.1f} img/s", flush=True)
    return results


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def run_model(name: str, images: int | None, batch_size: int, min_seconds: float, rounds: int,
              reduced: str | None) -> None:
    title, make, default_images = MODELS[name]
    plan = rows(reduced)
    with tempfile.TemporaryDirectory(prefix=f"bench-deploy-{name}-") as tmp:
        root = Path(tmp)
        checkpoint, data = make(root, images or default_images)
        print(f"\n{title} (random weights), {len(data)} images, batch {batch_size}: building artifacts…",
              flush=True)
        built = build(checkpoint, {r.artifact for r in plan}, data, batch_size, root)
        print(f"  measuring ({load()})", flush=True)
        results = measure(plan, built, data, batch_size, min_seconds, rounds)
    report(title, plan, results, built, len(data), batch_size)


def report(title: str, plan: list[Row], results: dict[Row, dict[str, float]],
           built: dict[tuple[str, str], tuple[Path, float]], images: int, batch_size: int) -> None:
    base = next(results[r] for r in plan if (r.path, r.precision) == BASELINE)
    print(f"\n{title}: {images} images, batch {batch_size}; {cpu_model()}, {os.cpu_count()} cores; {load()}")
    print(f"{'path':14s} {'precision':9s} {'model-only img/s':>17s} {'x ORT fp32':>10s} "
          f"{'end-to-end img/s':>17s} {'x ORT fp32':>10s} {'build s':>8s}")
    for row in plan:
        got = results[row]
        print(f"{row.path:14s} {row.precision:9s} {got['model']:17,.1f} {got['model'] / base['model']:10.2f} "
              f"{got['e2e']:17,.1f} {got['e2e'] / base['e2e']:10.2f} {built[row.artifact][1]:8.1f}")
    fp32 = [r for r in plan if r.precision == "fp32"]
    native = [r for r in plan if r.backend not in ("onnxruntime", "openvino")]
    print(f"fastest (within 5%): {leaders(plan, results)}; at fp32: {leaders(fp32, results)}; "
          f"PyTorch-native: {leaders(native, results)}", flush=True)


def leaders(plan: list[Row], results: dict[Row, dict[str, float]], within: float = 0.05) -> str:
    """The fastest row by model-only img/s, and any others within `within` of it (a tie on this machine)."""
    best = max(results[r]["model"] for r in plan)
    return ", ".join(f"{r.path} {r.precision}" for r in sorted(plan, key=lambda r: -results[r]["model"])
                     if results[r]["model"] >= (1 - within) * best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--images", type=int, help="images per model (default: 1024 for resnet56, 64 for "
                        "resnet50)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-seconds", type=float, default=1.5, help="model-only timing per row, per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all rows (the best counts)")
    args = parser.parse_args()

    import onnxruntime
    import openvino
    import torch

    reduced = torch_reduced_precision()
    print(f"{cpu_model()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino "
          f"{openvino.__version__}; the torch paths' reduced precision: "
          f"{reduced or 'none (no bf16 on this CPU)'}")
    began = time.perf_counter()
    for name in args.models:
        run_model(name, args.images, args.batch_size, args.min_seconds, args.rounds, reduced)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
