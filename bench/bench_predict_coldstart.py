"""Cold start of `toolkit predict`: ONNX model (no torch import) vs the PyTorch checkpoint.

Wall time of a fresh `toolkit predict -m MODEL img.png` process, median of a few runs, for the
sample model exported to ONNX and for the same model as its training checkpoint.
Target: the ONNX path <= 1 s on this machine.

    .venv/bin/python bench/bench_predict_coldstart.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(command: list[str], runs: int) -> tuple[float, list[float]]:
    subprocess.run(command, check=True, capture_output=True)  # warm the page cache once, not timed
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from PIL import Image

    from export.onnx import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.cli import SAMPLE_MODEL
    from toolkit.data import load_sample
    from toolkit.runtime.torch_runner import build_from_checkpoint

    toolkit = str(Path(sys.executable).parent / "toolkit")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, card, _ = build_from_checkpoint(load_checkpoint(SAMPLE_MODEL))
        onnx_path = export(model, card, folder / "model.onnx")
        image = folder / "img.png"
        Image.fromarray(load_sample("test").images[0]).save(image)
        results = {}
        for label, artifact in (("onnx", onnx_path), ("pytorch checkpoint", SAMPLE_MODEL)):
            results[label] = wall([toolkit, "predict", "-m", str(artifact), str(image)], args.runs)
        check = subprocess.run(
            [sys.executable, "-c", "import sys; from toolkit.cli import app\n"
             "from typer.testing import CliRunner\n"
             f"CliRunner().invoke(app, ['predict', '-m', {str(onnx_path)!r}, {str(image)!r}])\n"
             "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
        torch_loaded = check.stdout.strip().splitlines()[-1]

    print(f"toolkit predict cold start, median of {args.runs} runs (wall seconds, fresh process each)")
    for label, (median, times) in results.items():
        print(f"  {label:20s} {median:6.3f} s   runs: {', '.join(f'{t:.2f}' for t in times)}")
    onnx, ckpt = results["onnx"][0], results["pytorch checkpoint"][0]
    print(f"  onnx is {ckpt / onnx:.1f}x faster to first answer; "
          f"torch imported on the onnx path: {torch_loaded}")
    print(f"  target onnx <= 1.0 s: {'MET' if onnx <= 1.0 else 'NOT MET'}")


if __name__ == "__main__":
    main()
