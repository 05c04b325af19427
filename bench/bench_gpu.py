"""Issue 12's tables in one run: toolkit end-to-end vs pure-torch limits, folder pipeline vs decode limits.

Everything is generated (nothing downloaded): a CIFAR-10-format set of tiled sample digits and a
CIFAR ResNet-56 with re-estimated BatchNorm statistics (bench_eval.py's), random-weight ResNet-50
and a folder of structured JPEGs (500x375, like ImageNet's typical photo). Limits and the toolkit
are measured in the same process, so the ratios hold whatever the machine.

Tables (GPU machine):
1. CIFAR ResNet-56: `evaluate()` end-to-end at fp32 / fp16 / fp16 + CUDA graph / compiled, vs the
   model alone on input already on the GPU (fp32, fp16 channels-last, + CUDA graph, compiled);
   targets: fp16 e2e >= 0.85x the fp16 CUDA-graph model rate, compiled e2e >= 0.8x compiled model.
2. ResNet-50@224 over the JPEG folder: folder eval on the GPU (nvjpeg + GPU resize) vs
   min(nvjpeg pipeline, fp16 model) (target >= 0.8x), and the GPU-vs-CPU decode top-1 agreement.
3. Decode pool (every machine): PIL decode + resize on 1 thread, N threads, N processes; the
   toolkit's folder pipeline with N workers vs N x the one-core rate (target >= 0.7x).

On a machine without CUDA it says so, runs table 3 and exits 0.

    .venv/bin/python bench/bench_gpu.py [--images 10000] [--jpegs 2000] [--skip-compile]
    # on the lent GPU machine (torch + torchvision only): PYTHONPATH=. python bench/bench_gpu.py
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import cpu_model

# --- data -------------------------------------------------------------------------------------------

def make_jpegs(root: Path, count: int, size: tuple[int, int] = (500, 375), classes: int = 10) -> Path:
    """Class-per-subfolder JPEGs with photo-like structure (gradients, shapes, noise), quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse((x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))),
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"img_{i:05d}.jpg", quality=90)
    return root


def imagenet_card(num_classes: int = 10) -> object:
    from toolkit.card import ModelCard

    return ModelCard(arch="resnet50", class_names=tuple(f"class_{i:02d}" for i in range(num_classes)))


def rate(func: Callable[[], int], min_seconds: float = 2.0, warmup: int = 1) -> float:
    """Items per second of `func` (which returns how many items it did), after `warmup` calls."""
    for _ in range(warmup):
        func()
    done, began = 0, time.perf_counter()
    while True:
        done += func()
        elapsed = time.perf_counter() - began
        if elapsed >= min_seconds:
            return done / elapsed



def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>12}")


# --- table 3: decode pool (any machine) -------------------------------------------------------------

def decode_table(folder: Path, workers: int, seconds: float) -> dict[str, float]:
    from toolkit.data import load_image_folder
    from toolkit.decode_pool import DecodePool, load_uint8

    card = imagenet_card()
    data = load_image_folder(folder)
    paths = data.paths
    load = functools.partial(load_uint8, card=card)

    def one_core() -> int:
        for path in paths[:64]:
            load(path)
        return 64

    def pooled(kind: str) -> Callable[[], int]:
        pool = DecodePool(workers, kind).__enter__()
        list(pool.map(load, paths[:workers * 4]))  # start the workers (processes import the toolkit)

        def run() -> int:
            return sum(1 for _ in pool.map(load, paths))  # drain the ordered results

        run.pool = pool  # type: ignore[attr-defined]
        return run

    results = {"1 thread": rate(one_core, seconds)}
    for kind, plural in (("thread", "threads"), ("process", "processes")):
        run = pooled(kind)
        results[f"{workers} {plural}"] = rate(run, seconds, warmup=0)
        run.pool.__exit__(None, None, None)  # type: ignore[attr-defined]

    def pipeline() -> int:
        n = 0
        for batch in data.uint8_batches(card, 64, workers=workers):
            n += len(batch)
        return n

    results["folder pipeline"] = rate(pipeline, seconds, warmup=0)
    best = max(results[f"{workers} threads"], results[f"{workers} processes"])
    table(f"Decode + resize to 224 (PIL, {len(paths)} JPEGs 500x375) on {workers} cores: {cpu_model()}", [
        ("PIL decode + resize, 1 thread", f"{results['1 thread']:,.0f} img/s"),
        (f"{workers} threads", f"{results[f'{workers} threads']:,.0f} img/s"),
        (f"{workers} processes", f"{results[f'{workers} processes']:,.0f} img/s"),
        (f"toolkit folder pipeline, --workers {workers}", f"{results['folder pipeline']:,.0f} img/s"),
        ("threads / processes", f"{results[f'{workers} threads'] / results[f'{workers} processes']:.2f}x"),
        (f"pipeline / ({workers} x 1 thread)  [target >= 0.7]",
         f"{results['folder pipeline'] / (workers * results['1 thread']):.2f}x"),
        ("pipeline / best pool", f"{results['folder pipeline'] / best:.2f}x"),
    ])
    return results


# --- table 1: CIFAR ResNet-56 on the GPU ------------------------------------------------------------

def model_rate(model: Callable[[object], object], batch: object, seconds: float, warmup: int = 3) -> float:
    import torch

    def run() -> int:
        model(batch)
        return len(batch)  # type: ignore[arg-type]

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            done += run()
        torch.cuda.synchronize()
    return done / (time.perf_counter() - began)


def graphed(model: Callable[[object], object], example: object) -> Callable[[object], object]:
    """Pure-torch CUDA graph of `model` on a static input (the limit our runner is compared with)."""
    import torch

    static_in = example.clone()  # type: ignore[attr-defined]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(batch: object) -> object:
        static_in.copy_(batch)
        graph.replay()
        return static_out

    return run


def toolkit_eval(checkpoint: Path, data: object, batch_size: int, **options: object) -> tuple[float, object]:
    from toolkit.evaluate import evaluate
    from toolkit.runtime.registry import open_model

    with open_model(checkpoint, backend="torch", device="cuda", **options) as runner:
        report = evaluate(runner, data, batch_size=batch_size)  # type: ignore[arg-type]
    return report.images_per_second, report


def cifar_table(root: Path, images: int, batch_size: int, seconds: float, compile_modes: list[str]) -> None:
    import torch
    from bench_eval import make_cifar, make_resnet56

    from toolkit.checkpoint import load_checkpoint
    from toolkit.data import load_cifar
    from toolkit.preprocess import preprocess
    from toolkit.runtime.torch_runner import build_from_checkpoint

    make_cifar(root, images)
    checkpoint = make_resnet56(root, root)
    data = load_cifar(root, "cifar10", "test")
    model, card, _ = build_from_checkpoint(load_checkpoint(checkpoint))
    model = model.cuda().eval()
    x32 = torch.from_numpy(preprocess(data.images[:batch_size], card)).cuda()
    x16 = x32.half().contiguous(memory_format=torch.channels_last)
    rows, limits = [], {}
    with torch.inference_mode():
        limits["fp32"] = model_rate(model, x32, seconds)
        m16 = build_from_checkpoint(load_checkpoint(checkpoint))[0].cuda().eval().half()
        m16 = m16.to(memory_format=torch.channels_last)
        limits["fp16"] = model_rate(m16, x16, seconds)
    with torch.inference_mode():
        limits["graph"] = model_rate(graphed(m16, x16), x16, seconds)
    for mode in compile_modes:
        began = time.perf_counter()
        compiled = torch.compile(m16, mode=mode, dynamic=False)
        with torch.inference_mode():
            compiled(x16)
        took = time.perf_counter() - began
        with torch.inference_mode():
            limits[mode] = model_rate(compiled, x16, seconds)
        limits[f"{mode} seconds"] = took
    e2e = {
        "fp32": toolkit_eval(checkpoint, data, batch_size)[0],
        "fp16": toolkit_eval(checkpoint, data, batch_size, precision="fp16")[0],
        "graph": toolkit_eval(checkpoint, data, batch_size, precision="fp16", cuda_graphs=True)[0],
    }
    for mode in compile_modes:
        e2e[mode] = toolkit_eval(checkpoint, data, batch_size, precision="fp16", compile=mode,
                                 compile_cache=str(root / "inductor"))[0]
    rows += [
        (f"toolkit eval fp32 end-to-end (b{batch_size})", f"{e2e['fp32']:,.0f} img/s"),
        ("pure torch fp32, input on the GPU", f"{limits['fp32']:,.0f} img/s"),
        ("pure torch fp16 channels-last", f"{limits['fp16']:,.0f} img/s"),
        ("pure torch fp16 channels-last + CUDA graph", f"{limits['graph']:,.0f} img/s"),
        ("toolkit eval --precision fp16", f"{e2e['fp16']:,.0f} img/s"),
        ("toolkit eval --precision fp16 --cuda-graphs", f"{e2e['graph']:,.0f} img/s"),
        ("fp16 e2e (best) / fp16 CUDA-graph model  [target >= 0.85]",
         f"{max(e2e['fp16'], e2e['graph']) / limits['graph']:.2f}x"),
    ]
    for mode in compile_modes:
        rows += [(f"pure torch compile {mode} (compiled in {limits[f'{mode} seconds']:.0f} s)",
                  f"{limits[mode]:,.0f} img/s"),
                 (f"toolkit eval --compile {mode}", f"{e2e[mode]:,.0f} img/s"),
                 ("compiled e2e / compiled model  [target >= 0.8]", f"{e2e[mode] / limits[mode]:.2f}x")]
    try:
        ts = f"{torchscript_eval(checkpoint, root, data, batch_size):,.0f} img/s"
    except ImportError as exc:  # the GPU image lacks some of the export pipeline's dependencies
        ts = f"n/a ({exc})"
    rows.append(("toolkit eval of the TorchScript export (warm at load)", ts))
    table(f"CIFAR ResNet-56, {len(data)} images, {torch.cuda.get_device_name()}", rows)


def torchscript_eval(checkpoint: Path, root: Path, data: object, batch_size: int) -> float:
    from export.pipeline import run_export
    from toolkit.evaluate import evaluate
    from toolkit.runtime.registry import open_model

    path = run_export(checkpoint, "torchscript", root / "resnet56.ts", do_verify=False).path
    with open_model(path, device="cuda") as runner:
        return evaluate(runner, data, batch_size=batch_size).images_per_second  # type: ignore[arg-type]


# --- table 2: ResNet-50 over JPEGs on the GPU -------------------------------------------------------

def folder_table(folder: Path, root: Path, batch_size: int, seconds: float, compile_modes: list[str]) -> None:
    import torch

    from toolkit.archs import build_model
    from toolkit.data import load_image_folder
    from toolkit.gpu_decode import decode_agreement, tensor_uint8_batches
    from toolkit.runtime.registry import open_model

    card = imagenet_card()
    torch.manual_seed(0)
    model = build_model("resnet50", 10).eval()
    checkpoint = root / "resnet50_random.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    card.save(checkpoint.with_name(checkpoint.name + ".card.json"))  # type: ignore[attr-defined]
    data = load_image_folder(folder)
    x32 = torch.randn(batch_size, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        m = model.cuda()
        fp32 = model_rate(m, x32, seconds)
        m16 = m.half().to(memory_format=torch.channels_last)
        x16 = x32.half().contiguous(memory_format=torch.channels_last)
        fp16 = model_rate(m16, x16, seconds)

    def nvjpeg() -> int:
        n = 0
        for batch in tensor_uint8_batches(data.paths, card, batch_size, device="cuda"):
            n += len(batch)
        torch.cuda.synchronize()
        return n

    nv = rate(nvjpeg, seconds)
    rows = []
    e2e = {}
    for b in sorted({64, batch_size}):
        e2e[f"fp32 b{b}"] = toolkit_eval(checkpoint, data, b)[0]
    e2e["fp16"] = toolkit_eval(checkpoint, data, batch_size, precision="fp16")[0]
    for mode in compile_modes:
        e2e[mode] = toolkit_eval(checkpoint, data, batch_size, precision="fp16", compile=mode,
                                 compile_cache=str(root / "inductor"))[0]
    with open_model(checkpoint, backend="torch", device="cuda", precision="fp16") as runner:
        agreement = decode_agreement(runner, data, batch_size=batch_size, limit=512)["top1_agreement"]
    for key, value in e2e.items():
        rows.append((f"toolkit eval --device cuda {key}", f"{value:,.0f} img/s"))
    rows += [
        (f"pure torch fp32 / fp16 channels-last, b{batch_size}", f"{fp32:,.0f} / {fp16:,.0f} img/s"),
        ("nvjpeg decode + GPU resize (toolkit.gpu_decode)", f"{nv:,.0f} img/s"),
        ("fp16 folder eval / min(nvjpeg, fp16 model)  [target >= 0.8]",
         f"{e2e['fp16'] / min(nv, fp16):.2f}x"),
        ("top-1 agreement GPU decode vs CPU decode  [target >= 99.5%]", f"{agreement:.2%}"),
    ]
    table(f"ResNet-50@224 over {len(data)} JPEGs, {torch.cuda.get_device_name()}", rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--jpegs", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=1024, help="CIFAR batch size")
    parser.add_argument("--folder-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per limit measurement")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()

    from toolkit.decode_pool import default_workers

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_jpegs(root / "jpegs", args.jpegs)
        decode_table(folder, workers, args.seconds)
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if not cuda:
            print("\nno CUDA GPU here (torch.cuda.is_available() is False): the GPU tables were not run")
            return 0
        modes = [] if args.skip_compile else ["reduce-overhead", "max-autotune"]
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        cifar_table(root / "cifar", args.images, args.batch_size, args.seconds, modes)
        folder_table(folder, root, args.folder_batch_size, args.seconds, modes[:1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
