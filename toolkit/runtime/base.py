"""The one Runner protocol every backend implements (as Polygraphy's runners).

`runner(batch)` takes float32 NCHW shaped by the card and returns float32 logits (N, classes).
The public call validates the batch and names what was expected; backends implement `_infer`
only. Fixed-batch artifacts (static ONNX, TensorRT profiles) are fed in padded chunks here, once,
so callers never care.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from ..card import ModelCard
from ..errors import InputError, ModelFormatError, ToolkitError, first_line

if TYPE_CHECKING:
    from ..artifacts import ArtifactFacts


class Runner(ABC):
    """Callable model with a card (what the model is), facts (what the file is), a context-manager lifetime.

    Backends are built by `open`, which `open_model` calls with the options the user gave; an option
    a backend does not declare as a keyword of its `open` is refused there, by name.
    """

    backend: str = "?"
    # True when `run_uint8` normalises on the runner's device (the torch runners on a GPU): loops then
    # hand it uint8 batches instead of preprocessing on the host
    accepts_uint8: bool = False

    def __init__(self, card: ModelCard, *, source: str, device: str = "cpu",
                 fixed_batch_size: int | None = None, max_batch_size: int | None = None,
                 precision: str = "fp32", facts: ArtifactFacts | None = None) -> None:
        self.card = card
        self.facts = facts
        self.source = source
        self.device = device
        self.fixed_batch_size = fixed_batch_size
        self.max_batch_size = fixed_batch_size or max_batch_size
        self.precision = facts.precision if facts is not None else precision

    @classmethod
    def open(cls, path: Any, *, device: str = "cpu") -> Runner:
        """Open the artifact at `path` (a file, or a URL for remote backends) on `device`.

        Every backend in the registry implements it; its own options are keyword-only parameters
        (never `**kwargs`), and those names are the options `open_model` accepts for it. Not abstract,
        only because wrappers and stand-ins (the server's batching runner, test fakes) are Runners that
        are built around another object rather than opened from a file.
        """
        raise NotImplementedError(f"{cls.__name__} is not opened from a file; backends implement open()")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check(batch)
        chunk = self.max_batch_size
        if chunk is None or (len(batch) <= chunk and (self.fixed_batch_size is None or len(batch) == chunk)):
            return self._checked_output(self._infer(batch), len(batch))
        outputs = []
        for start in range(0, len(batch), chunk):
            part = batch[start:start + chunk]
            real = len(part)
            if self.fixed_batch_size is not None and real < chunk:
                part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), np.float32)])
            outputs.append(self._checked_output(self._infer(part), len(part))[:real])
        return np.concatenate(outputs)

    def run_uint8(self, images: Any) -> np.ndarray:
        """uint8 NHWC images -> logits. Here: `preprocess` on the host, then the call; runners that
        normalise on their device (`accepts_uint8`) override it."""
        from ..preprocess import preprocess

        if not isinstance(images, np.ndarray):
            raise InputError(f"expected uint8 images as a numpy array, got {type(images).__name__}")
        return self(preprocess(images, self.card))

    def _check(self, batch: Any) -> np.ndarray:
        expected = (self.card.input_size[0], self.card.height, self.card.width)
        if not isinstance(batch, np.ndarray):
            raise InputError(f"expected a numpy float32 array shaped (N, {', '.join(map(str, expected))}), "
                             f"got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InputError(f"expected dtype float32, got {batch.dtype}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            raise InputError(f"expected shape (N, {', '.join(map(str, expected))}) with N >= 1, "
                             f"got {tuple(batch.shape)}")
        return np.ascontiguousarray(batch)

    def _checked_output(self, logits: np.ndarray, n: int) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.shape != (n, self.card.num_classes):
            raise InputError(f"{self.backend} returned shape {logits.shape}, "
                             f"expected ({n}, {self.card.num_classes}): "
                             "the artifact and its card disagree")
        return logits.astype(np.float32, copy=False)

    def warm_up(self, calls: int = 1) -> Self:
        """Run `calls` batches of zeros (the fixed batch size, else one image) before anyone times the
        runner, and return it: sessions allocate their arenas, GPU providers load and pick kernels,
        torch captures its graphs and compiles. Every backend ends `open` with it (its `warmup`
        option), so constructors only store. A model that loads but cannot run fails here, naming
        the file, and the runner is closed."""
        try:
            for _ in range(calls):
                self._warm_up_once()
        except BaseException as exc:
            self.close()
            if isinstance(exc, ToolkitError) or not isinstance(exc, Exception):
                raise
            raise ModelFormatError(f"{self.source}: {self.backend} loaded it but cannot run it "
                                   f"({first_line(exc)})") from None
        return self

    def _warm_up_once(self) -> None:
        """One warm-up call; a backend whose real batches take another path than one image overrides it
        (OpenVINO's split batches; torch's uint8 path and fixed capture shape)."""
        self(np.zeros((self.fixed_batch_size or 1, *self.card.input_size), np.float32))

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the backend on a validated, contiguous float32 batch."""

    def close(self) -> None:  # noqa: B027 - optional hook: most runners hold nothing to release
        """Release sessions, engines, connections. Idempotent."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "source": self.source,
                "precision": self.precision, "fixed_batch_size": self.fixed_batch_size,
                "max_batch_size": self.max_batch_size}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, device={self.device!r})"
