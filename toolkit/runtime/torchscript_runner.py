"""TorchScript archives written by `toolkit export --format torchscript` (card in `_extra_files`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..card import ModelCard
from ..errors import DataError, ModelFormatError
from .base import Runner
from .metadata import TORCHSCRIPT_CARD_FILE, card_from_props, first_line
from .torch_runner import torch_device


class TorchScriptRunner(Runner):
    """A `torch.jit.ScriptModule` under `torch.inference_mode`."""

    backend = "torchscript"

    def __init__(self, module: Any, card: ModelCard, *, source: str, device: str = "cpu") -> None:
        import torch

        super().__init__(card, source=source, device=device)
        self._torch = torch
        self._device = torch_device(device)
        self.module = module.eval()

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

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self._device))
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.module = None
