"""Run a Runner over a dataset. `collect_logits` is the one loop every consumer shares."""

from __future__ import annotations

import numpy as np

from .data import Dataset
from .runtime.base import Runner


def collect_logits(runner: Runner, dataset: Dataset, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) for every item of `dataset`, preprocessed by the runner's card."""
    outputs = [runner(batch) for batch in dataset.batches(runner.card, batch_size)]
    if not outputs:
        return np.zeros((0, runner.card.num_classes), dtype=np.float32)
    return np.concatenate(outputs)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0
