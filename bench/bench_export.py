"""Images/s of one model across runtimes, side by side: torch eager, TorchScript, ONNX Runtime fp32/int8,
OpenVINO fp32/int8, with ratios to torch eager and the int8/fp32 ratio on ONNX Runtime.

Cases: the bundled sample (CIFAR ResNet-20, 32x32, batch 256) and torchvision resnet50 at 224 (random
weights, batch 16). Inputs are real images (the sample digits through the one preprocess function);
int8 files are calibrated on the sample train split. Every runner uses the same thread count.

    .venv/bin/python bench/bench_export.py [--iters 10] [--only sample|resnet50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import call_times, median


def build(case: str):
    from toolkit.card_layers import resolve_card
    from toolkit.checkpoint import load_checkpoint
    from toolkit.cli import SAMPLE_MODEL
    from toolkit.runtime.torch_runner import build_from_checkpoint

    if case == "sample":
        model, card, _ = build_from_checkpoint(load_checkpoint(SAMPLE_MODEL))
        return model, card, 256
    from toolkit.archs import build_model

    card = resolve_card(arch="resnet50", num_classes=1000, stem="imagenet")
    return build_model("resnet50", 1000), card, 16


def runners(model, card, folder: Path, calib_size: int):
    from export import onnx as onnx_export
    from export import torchscript
    from export.quantize import quantize
    from toolkit.data import load_sample
    from toolkit.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from toolkit.runtime.openvino_runner import OpenVINORunner
    from toolkit.runtime.torch_runner import TorchRunner
    from toolkit.runtime.torchscript_runner import TorchScriptRunner

    fp32 = onnx_export.export(model, card, folder / "m.onnx")
    int8 = quantize(fp32, card, folder / "m.int8.onnx", load_sample("train"), calib_size=calib_size)
    ts = torchscript.export(model, card, folder / "m.ts")
    return [
        ("torch eager", "fp32", TorchRunner(model, card, source="eager")),
        ("TorchScript", "fp32", TorchScriptRunner.open(ts)),
        ("ONNX Runtime", "fp32", OnnxRuntimeRunner.open(fp32)),
        ("ONNX Runtime", "int8", OnnxRuntimeRunner.open(int8)),
        ("OpenVINO", "fp32", OpenVINORunner.open(fp32)),
        ("OpenVINO", "int8", OpenVINORunner.open(int8)),
    ]


def bench_case(case: str, iters: int) -> None:
    import torch

    from toolkit.data import load_sample
    from toolkit.runtime.cpu import physical_cores

    torch.set_num_threads(physical_cores())
    model, card, batch_size = build(case)
    real = next(load_sample("test").batches(card, batch_size))
    batch = np.ascontiguousarray(np.resize(real, (batch_size, *real.shape[1:])))
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, precision, runner in runners(model, card, Path(tmp), 512 if case == "sample" else 64):
            with runner:
                seconds = median(call_times(lambda r=runner: r(batch), repeat=iters, warmup=2))
            rows.append((name, precision, batch_size / seconds))
    eager = rows[0][2]
    print(f"\n### {card.arch} {card.height}x{card.width}, batch {batch_size}, {physical_cores()} threads, "
          f"median of {iters}\n")
    print("| runtime | precision | images/s | x torch eager |")
    print("|---|---|---:|---:|")
    for name, precision, speed in rows:
        print(f"| {name} | {precision} | {speed:,.0f} | {speed / eager:.2f}x |")
    ort = {p: s for n, p, s in rows if n == "ONNX Runtime"}
    ov = {p: s for n, p, s in rows if n == "OpenVINO"}
    print(f"\nint8/fp32: ONNX Runtime {ort['int8'] / ort['fp32']:.2f}x, "
          f"OpenVINO {ov['int8'] / ov['fp32']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--only", choices=("sample", "resnet50"))
    args = parser.parse_args()
    import platform

    print(f"CPU: {platform.processor() or platform.machine()}; "
          f"flags: {' '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni', 'amx_int8') if _has_flag(f))}")
    for case in ("sample", "resnet50"):
        if args.only in (None, case):
            bench_case(case, args.iters if case == "sample" else max(3, args.iters // 2))


def _has_flag(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    main()
