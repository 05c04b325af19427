"""TorchScript: traced (scripted where tracing cannot), frozen, card and facts in `_extra_files`.

fp16 archives hold fp16 weights and activations behind fp32 inputs/outputs (a cast at each edge), as
fp16 ONNX files do, so every runner feeds them the same float32 batches.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

from toolkit.artifacts import ArtifactFacts, card_input, card_output, torchscript_extra_files
from toolkit.card import ModelCard
from toolkit.errors import ExportError, UsageError, first_line
from toolkit.fileio import atomic_path

PRECISIONS = ("fp32", "fp16")


def _half(model: Any) -> Any:
    """An fp16 copy of `model` behind fp32 edges (the caller's model stays fp32 for verification)."""
    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.half()).float()

    return HalfPrecision(copy.deepcopy(model).half()).eval()


def to_script(model: Any, card: ModelCard, precision: str = "fp32") -> tuple[Any, str]:
    """A frozen ScriptModule and how it was made: trace on a batch of 2 at the card's size; script if
    tracing fails."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"TorchScript precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = model.eval()
    if precision == "fp16":
        model = _half(model)
    example = torch.randn(2, *card.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still the only .ts
        return _trace_or_script(model, example)


def _trace_or_script(model: Any, example: Any) -> tuple[Any, str]:
    import torch

    try:
        with torch.no_grad():
            scripted, how = torch.jit.trace(model, example, check_trace=False), "torch.jit.trace"
    except Exception as trace_error:  # noqa: BLE001 - data-dependent control flow: try scripting
        try:
            scripted, how = torch.jit.script(model), "torch.jit.script"
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"TorchScript: neither tracing ({first_line(trace_error)}) nor scripting "
                              f"({first_line(exc)}) works for this model") from None
    return torch.jit.freeze(scripted.eval()), how


def export(model: Any, card: ModelCard, output: str | Path, precision: str = "fp32") -> Path:
    """Write `output` (atomically) with its card and facts, and return it."""
    import torch

    module, how = to_script(model, card, precision)
    facts = ArtifactFacts("torchscript", precision=precision, exporter=f"{how} (torch {torch.__version__})",
                          inputs=(card_input(card),), outputs=(card_output(card),))
    output = Path(output)
    buffer = io.BytesIO()  # torch.jit.save into a file aborts the process on a full disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, buffer, _extra_files=torchscript_extra_files(card, facts))
    with atomic_path(output) as tmp, open(tmp, "wb") as handle:
        handle.write(buffer.getbuffer())
    return output
