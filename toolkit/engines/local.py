"""The local engine: evaluate.py's `evaluate`/`predict` in this process, behind the engine verbs.

A thin adapter on purpose: the loop, the prefetching and the numbers are evaluate.py's. It adds only
what the engine contract asks of every engine: a `RunnerSpec` instead of an open Runner, and
`predict --output-dir` written in the same shard layout as the ray engine's (not resumable here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..data import load_dataset as _load_dataset
from ..errors import UsageError
from ..evaluate import PredictInput, gather_inputs
from ..evaluate import evaluate as _evaluate
from ..evaluate import predict as _predict
from . import EvalRun, RunnerSpec


def _no_engine_options(options: dict[str, Any]) -> None:
    given = sorted(f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None)
    if given:
        raise UsageError(f"{', '.join(given)} only apply to --engine ray")


def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "test",
                 download: bool = False) -> Dataset:
    return _load_dataset(name, data_dir, split, download)


def gather(specs: Sequence[str], stdin_lines: Iterable[str] | None = None) -> list[PredictInput]:
    return gather_inputs(specs, stdin_lines)


def evaluate(spec: RunnerSpec, dataset: Dataset, *, batch_size: int = 256,
             progress: Callable[[int], None] | None = None, output_dir: Path | None = None,
             workers: int | None = None, **engine_options: Any) -> EvalRun:
    """`evaluate.evaluate` on one Runner. `output_dir` is the CLI's to write (write_eval_outputs);
    `workers`: decode threads (default: every core)."""
    _no_engine_options(engine_options)
    with spec.open() as runner:
        return EvalRun(_evaluate(runner, dataset, batch_size=batch_size, progress=progress, workers=workers))


def predict(spec: RunnerSpec, inputs: Sequence[PredictInput], *, top_k: int = 5, batch_size: int = 32,
            progress: Callable[[int], None] | None = None, output_dir: Path | None = None,
            workers: int | None = None, **engine_options: Any) -> list[dict[str, Any]]:
    """`evaluate.predict` on one Runner; with `output_dir`, also written as prediction shards."""
    _no_engine_options(engine_options)
    with spec.open() as runner:
        results = _predict(runner, list(inputs), top_k=top_k, batch_size=batch_size, progress=progress,
                           workers=workers)
    if output_dir is not None:
        from .shards import predict_job, write_predictions

        write_predictions(Path(output_dir), predict_job(spec, inputs, top_k), results)
    return results
