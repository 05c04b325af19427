"""TorchScript: traced (scripted where tracing cannot), frozen for inference, card in `_extra_files`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from toolkit.card import ModelCard
from toolkit.errors import ExportError
from toolkit.fileio import atomic_path
from toolkit.runtime.metadata import TORCHSCRIPT_CARD_FILE, first_line


def to_script(model: Any, card: ModelCard) -> Any:
    """A frozen ScriptModule: trace on a batch of 2 at the card's size; script if tracing fails."""
    import torch

    model = model.eval()
    example = torch.randn(2, *card.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still the only .ts
        return _trace_or_script(model, example)


def _trace_or_script(model: Any, example: Any) -> Any:
    import torch

    try:
        with torch.no_grad():
            scripted = torch.jit.trace(model, example, check_trace=False)
    except Exception as trace_error:  # noqa: BLE001 - data-dependent control flow: try scripting
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"TorchScript: neither tracing ({first_line(trace_error)}) nor scripting "
                              f"({first_line(exc)}) works for this model") from None
    return torch.jit.freeze(scripted.eval())


def export(model: Any, card: ModelCard, output: str | Path) -> Path:
    """Write `output` (atomically) and return it."""
    import torch

    module = to_script(model, card)
    output = Path(output)
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(tmp), _extra_files={TORCHSCRIPT_CARD_FILE: card.to_json()})
    return output
