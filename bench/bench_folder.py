"""A folder of small real JPEGs at the machine's speed: decoding alone, the model alone, `evaluate` e2e.

Issue 18 item 6: on the 10,000 real CIFAR-10 test JPEGs the ONNX eval ran at 0.72x of the slower of its
two limits. This bench rebuilds that situation from files generated here (nothing is downloaded):

- a CIFAR-like folder: 10 class folders of 32x32 JPEGs at quality 75 (`--count`, default 10,000), cut
  from the two real photographs scikit-learn ships (`sklearn.datasets.load_sample_images`): random
  square crops of 32..128 pixels, reduced to 32x32, optionally mirrored, so every file holds real
  photographic texture and compresses like CIFAR's JPEGs (about 1 kB each);
- the model (`--model`): `resnet56` (default; the issue's size) is a CIFAR ResNet-56 with random weights
  whose BatchNorm statistics are re-estimated on real-looking images (bench_eval.make_resnet56), or
  `sample`, the bundled ResNet-20 trained on the sample digits; either is exported to fp32 ONNX with
  `export.pipeline.run_export`.

Measured in the same run, alternating rounds (`--rounds`), every rate steady-state:
1. decode: the decode pool alone, `Dataset.uint8_batches` (Pillow on every core, files in order);
2. model: ONNX Runtime alone on one preprocessed batch (`--batch-size`, default 256), repeated;
3. end to end: `toolkit.evaluate.evaluate` over the folder with the onnxruntime runner.
It prints the median of each and the ratio end-to-end / min(decode, model) (target >= 0.8).

    .venv/bin/python bench/bench_folder.py [--count 10000] [--model resnet56|sample] [--rounds 3]
                                           [--workdir DIR]  # keep the folder and the ONNX for reruns
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import cpu_model

TARGET = 0.8
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_jpeg_folder(root: Path, count: int, size: int = 32, quality: int = 75, seed: int = 0) -> Path:
    """`count` JPEGs in 10 class folders, cut from scikit-learn's bundled real photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(np.asarray(p)) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, 4 * size + 1))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        tile = photo.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tile.save(root / CLASSES[i % len(CLASSES)] / f"{i:05d}.jpg", quality=quality)
    return root


def make_model(kind: str, root: Path) -> Path:
    """The checkpoint to export: the bundled sample ResNet-20, or a ResNet-56 as bench_eval builds it."""
    if kind == "sample":
        import toolkit.sample

        return Path(toolkit.sample.__file__).with_name("resnet20_digits.pt")
    from bench_eval import make_cifar, make_resnet56

    data_root = root / "bn-data"
    make_cifar(data_root, 1024)
    return make_resnet56(root, data_root)


def decode_rate(dataset, card, batch_size: int) -> float:
    """Images/s of the decode pool alone (uint8 batches at the card's size), first batch excluded."""
    batches = dataset.uint8_batches(card, batch_size)
    first = len(next(batches))
    began, done = time.perf_counter(), 0
    for batch in batches:
        done += len(batch)
    return done / (time.perf_counter() - began) if done else first / 1e-9


def model_rate(runner, batch: np.ndarray, min_seconds: float = 3.0) -> float:
    """Images/s of the runner alone on one ready batch, repeated for at least `min_seconds`."""
    runner(batch)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < min_seconds:
        runner(batch)
        done += len(batch)
    return done / (time.perf_counter() - began)


def prepare(workdir: Path, count: int, model: str) -> tuple[Path, Path]:
    """The JPEG folder and the fp32 ONNX in `workdir`, made unless already there (reruns reuse them)."""
    from export.pipeline import run_export

    folder = workdir / "images"
    if not (folder.is_dir() and any(folder.iterdir())):
        began = time.perf_counter()
        write_jpeg_folder(folder, count)
        print(f"wrote {count} JPEGs (32x32, quality 75) in {time.perf_counter() - began:.1f} s")
    onnx = workdir / f"{model}.onnx"
    if not onnx.is_file():
        run_export(make_model(model, workdir), "onnx", onnx, do_verify=False)
    return folder, onnx


def measure(folder: Path, onnx: Path, batch_size: int, rounds: int) -> dict[str, float]:
    """Median images/s of decoding alone, the model alone and `evaluate`, in alternating rounds."""
    from toolkit.data import load_image_folder
    from toolkit.evaluate import evaluate
    from toolkit.runtime.registry import open_model

    rates: dict[str, list[float]] = {"decode": [], "model": [], "e2e": []}
    with open_model(onnx, backend="onnxruntime") as runner:
        card = runner.card
        # the labels are arbitrary (speed is what is measured): the folders' classes named as the model's
        dataset = replace(load_image_folder(folder), class_names=card.class_names)
        batch = next(dataset.batches(card, batch_size))
        for _ in range(rounds):
            rates["decode"].append(decode_rate(dataset, card, batch_size))
            rates["model"].append(model_rate(runner, batch))
            rates["e2e"].append(evaluate(runner, dataset, batch_size=batch_size).images_per_second)
            print("round: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="JPEGs to generate")
    parser.add_argument("--model", choices=("resnet56", "sample"), default="resnet56")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three measurements")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the JPEG folder and the ONNX here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        workdir = args.workdir or Path(tmp)
        folder, onnx = prepare(workdir, args.count, args.model)
        median = measure(folder, onnx, args.batch_size, args.rounds)
        count = sum(1 for p in folder.rglob("*.jpg"))
    ratio = median["e2e"] / min(median["decode"], median["model"])
    print(f"\n{cpu_model()}, {count} JPEGs, {args.model} ONNX fp32 (onnxruntime), "
          f"batch {args.batch_size}, median of {args.rounds} rounds")
    print(f"decode pool alone    {median['decode']:9,.0f} img/s")
    print(f"model alone          {median['model']:9,.0f} img/s")
    print(f"evaluate end to end  {median['e2e']:9,.0f} img/s")
    print(f"ratio e2e / min(decode, model) = {ratio:.2f}  target >= {TARGET}: "
          f"{'MET' if ratio >= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
