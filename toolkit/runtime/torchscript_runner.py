"""TorchScript archives written by `toolkit export --format torchscript` (card in `_extra_files`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


from ..card import ModelCard
from ..errors import DataError, ModelFormatError
from .metadata import TORCHSCRIPT_CARD_FILE, card_from_props, first_line
from .torch_runner import TorchRunner, torch_device


class TorchScriptRunner(TorchRunner):
    """A `torch.jit.ScriptModule`, run exactly as the eager reference is (same device handling and call)."""

    backend = "torchscript"

    @classmethod
    def open(cls, path: str | Path, device: str = "cpu", **_: Any) -> TorchScriptRunner:
        import torch

        path = Path(path)
        if not path.is_file():
            raise ModelFormatError(f"TorchScript file not found: {path}")
        extra = {TORCHSCRIPT_CARD_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
                module = torch.jit.load(str(path), map_location=torch_device(device), _extra_files=extra)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"{path}: not a readable TorchScript archive ({first_line(exc)})") from None
        text = extra[TORCHSCRIPT_CARD_FILE]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        try:
            card = ModelCard.from_json(text) if text else card_from_props({}, path)
        except DataError as exc:
            raise ModelFormatError(f"{path}: its model card is unreadable: {exc}") from None
        return cls(module, card, source=str(path), device=device)

    def close(self) -> None:
        self.model = None
