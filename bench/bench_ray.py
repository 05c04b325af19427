"""`eval --engine ray` vs `--engine local` on one machine: images/s, the ratio, and where Ray's overhead goes.

Setup (all generated, nothing downloaded): 10,000 PNGs (40x40, class-per-subfolder) made from the
sample's real digits with a little noise, and the bundled sample model (CIFAR ResNet-20) exported to
fp32 ONNX. Both engines evaluate the same folder end to end: list, read, decode, `to_uint8`,
`preprocess`, ONNX Runtime, metrics. Local is evaluate.py's loop in this process; ray is Ray Data
(decode tasks -> one actor pool of replicas) on a local cluster started once beforehand, as an
existing cluster would be (its start-up is printed apart). Runs alternate local/ray `--repeat` times
and the best of each is kept, since other processes share this machine. Target: ray >= 0.7x local.

    .venv/bin/python bench/bench_ray.py [--images 10000] [--batch-size 256] [--replicas N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from _timing import cpu_model  # bench/ is on the path: scripts run as `python bench/<script>.py`


def make_onnx(path: Path) -> Path:
    from export.onnx import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.cli import SAMPLE_MODEL
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(SAMPLE_MODEL))
    return export(model, card, path)



def timed(run, spec, data, batch_size: int, **options) -> tuple[float, float, object]:
    """(wall seconds, seconds to the first finished batch, EvalRun)."""
    first: list[float] = []
    start = time.perf_counter()

    def progress(_n: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    result = run.evaluate(spec, data, batch_size=batch_size, progress=progress, **options)
    return time.perf_counter() - start, first[0] if first else 0.0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from toolkit.data import load_image_folder, write_sample_folder
    from toolkit.engines import RunnerSpec, get_engine

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        data = load_image_folder(write_sample_folder(root / "images", args.images))
        spec = RunnerSpec(str(make_onnx(root / "sample.onnx")))
        print(f"setup: {len(data):,} PNGs + sample ONNX in {time.perf_counter() - began:.1f} s")
        print(f"CPU: {cpu_model()} x {os.cpu_count()} logical cores; load average {os.getloadavg()[0]:.1f}")

        began = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        cluster_start = time.perf_counter() - began
        local, on_ray = get_engine("local"), get_engine("ray")
        local_runs, ray_runs = [], []
        for _ in range(args.repeat):
            local_runs.append(timed(local, spec, data, args.batch_size))
            ray_runs.append(timed(on_ray, spec, data, args.batch_size, replicas=args.replicas))
        ray.shutdown()

    best_local = min(local_runs, key=lambda r: r[0])
    best_ray = min(ray_runs, key=lambda r: r[0])
    assert best_ray[2].report.metrics == best_local[2].report.metrics, "the engines disagree"
    local_ips, ray_ips = len(data) / best_local[0], len(data) / best_ray[0]
    steady = (len(data) - args.batch_size) / max(1e-9, best_ray[0] - best_ray[1])
    print(f"local engine : {best_local[0]:6.2f} s  {local_ips:8,.0f} img/s   (runs: "
          f"{', '.join(f'{r[0]:.2f}' for r in local_runs)} s)")
    print(f"ray engine   : {best_ray[0]:6.2f} s  {ray_ips:8,.0f} img/s   (runs: "
          f"{', '.join(f'{r[0]:.2f}' for r in ray_runs)} s)")
    median_ratio = statistics.median(r[0] for r in local_runs) / statistics.median(r[0] for r in ray_runs)
    print(f"ratio ray/local: {ray_ips / local_ips:.2f}x best of {args.repeat}, {median_ratio:.2f}x median "
          "(target >= 0.7x)")
    print(f"ray overhead: {best_ray[0] - best_local[0]:+.2f} s per run, of which {best_ray[1]:.2f} s to the "
          f"first finished batch (actor start-up, model load, first decode); after that {steady:,.0f} img/s; "
          f"plus {cluster_start:.1f} s once to start the local cluster (not counted above)")
    print(f"accuracy (both engines): {best_local[2].report.accuracy:.4f}")


if __name__ == "__main__":
    main()
