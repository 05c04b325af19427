"""OpenVINO on CPU, reading the toolkit's ONNX files directly (fp32, fp16 and int8 Q/DQ alike).

Large batches go through a THROUGHPUT-compiled model split across its parallel infer requests
(streams), as OpenVINO's benchmark_app does; batches too small to split use a LATENCY-compiled
model, compiled on first need. Inference precision is pinned to f32 so that fp32 artifacts stay
within fp32 tolerance on CPUs whose default would be bf16. Never imports torch.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts, check_declared_input, read_onnx
from ..card import ModelCard
from ..errors import BackendUnavailableError, ModelFormatError, UsageError, first_line
from .base import Runner

INSTALL_HINT = "install the openvino extra: pip install 'resnet-toolkit[openvino]'"
HINTS = ("auto", "throughput", "latency")


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return openvino


class OpenVINORunner(Runner):
    """A compiled OpenVINO model (CPU) over an ONNX file with a toolkit card."""

    backend = "openvino"

    def __init__(self, core: Any, model: Any, card: ModelCard, *, source: str,
                 facts: ArtifactFacts | None = None, hint: str = "auto",
                 inference_precision: str = "f32") -> None:
        batch_dim = model.inputs[0].get_partial_shape()[0]
        fixed = batch_dim.get_length() if batch_dim.is_static else None
        super().__init__(card, source=source, device="cpu", fixed_batch_size=fixed, facts=facts)
        if hint not in HINTS:
            raise UsageError(f"unknown OpenVINO hint {hint!r}; choose one of {', '.join(HINTS)}")
        self._core, self._model, self._hint = core, model, hint
        self._config = {"INFERENCE_PRECISION_HINT": inference_precision}
        self._compiled: dict[str, Any] = {}
        self._queue: list[Any] | None = None  # infer requests for split batches
        self._requests = 1
        if hint == "latency" or (hint == "auto" and fixed is not None):
            self._compile("LATENCY")  # nothing to split: one request with every core
        else:
            compiled = self._compile("THROUGHPUT")
            self._requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", hint: str = "auto",
             inference_precision: str = "f32", warmup: int = 1) -> OpenVINORunner:
        """`hint`: auto | throughput | latency; `inference_precision`: OpenVINO's f32 (default), bf16, f16;
        `warmup`: calls run at load (`Runner.warm_up`)."""
        ov = _import_openvino()
        if device != "cpu":
            raise BackendUnavailableError(
                f"the OpenVINO backend runs on cpu here, not {device}; "
                "use --backend onnxruntime or tensorrt for GPUs"
            )
        if hint not in HINTS:
            raise UsageError(f"unknown OpenVINO hint {hint!r}; choose one of {', '.join(HINTS)}")
        path = Path(path)
        card, facts = read_onnx(path)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise ModelFormatError(f"{path}: OpenVINO cannot read it ({first_line(exc)})") from None
        declared = model.inputs[0].get_partial_shape()
        check_declared_input(card, [d.get_length() if d.is_static else None for d in declared], path,
                             "the ONNX graph")
        return cls(core, model, card, source=str(path), facts=facts, hint=hint,
                   inference_precision=inference_precision).warm_up(warmup)

    def _compile(self, hint: str) -> Any:
        if hint not in self._compiled:
            try:
                self._compiled[hint] = self._core.compile_model(
                    self._model, "CPU", {**self._config, "PERFORMANCE_HINT": hint})
            except Exception as exc:  # noqa: BLE001
                raise ModelFormatError(f"{self.source}: OpenVINO cannot compile it "
                                       f"({first_line(exc)})") from None
        return self._compiled[hint]

    def _warm_up_once(self) -> None:
        """The THROUGHPUT model's infer requests, one image each, where batches are split across them
        (one image alone would compile the LATENCY model, which those batches never use)."""
        if self._requests > 1 and self.fixed_batch_size is None:
            self._infer_parallel(np.zeros((self._requests, *self.card.input_size), np.float32),
                                 self._requests)
        else:
            super()._warm_up_once()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self._requests > 1 and self.fixed_batch_size is None and len(batch) >= 2 * self._requests:
            return self._infer_parallel(batch, self._requests)
        result = self._compile("THROUGHPUT" if self._hint == "throughput" else "LATENCY")({0: batch})[0]
        return np.array(result, dtype=np.float32, copy=True)  # the request reuses its output buffer

    def _infer_parallel(self, batch: np.ndarray, splits: int) -> np.ndarray:
        # Plain infer requests, started together and waited in order. No Python callbacks: an
        # AsyncInferQueue callback holds OpenVINO threads on the GIL and could deadlock close().
        if self._queue is None:
            compiled = self._compile("THROUGHPUT")
            self._queue = [compiled.create_infer_request() for _ in range(splits)]
        out = np.empty((len(batch), self.card.num_classes), dtype=np.float32)
        bounds = np.linspace(0, len(batch), splits + 1).astype(int)
        spans = list(itertools.pairwise(bounds))
        for request, (start, stop) in zip(self._queue, spans):
            request.start_async({0: batch[start:stop]})
        for request, (start, stop) in zip(self._queue, spans):
            request.wait()
            out[start:stop] = request.get_output_tensor(0).data
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hint": self._hint, "infer_requests": self._requests}

    def close(self) -> None:
        self._queue = None
        self._compiled.clear()
