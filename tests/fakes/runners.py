"""Runners without a network: enough to test the plumbing around a model (loops, alignment, timing)."""

from __future__ import annotations

import numpy as np

from toolkit.runtime.base import Runner


class ConstantRunner(Runner):
    """Answers class 1 where the preprocessed image's mean is above 0, else class 0 (one-hot logits)."""

    backend = "constant"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(batch), self.card.num_classes), np.float32)
        logits[np.arange(len(batch)), (batch.mean((1, 2, 3)) > 0).astype(int)] = 1
        return logits
