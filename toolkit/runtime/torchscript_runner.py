"""TorchScript archives from `toolkit export --format torchscript` (card and facts in `_extra_files`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..artifacts import read_artifact
from ..errors import ModelFormatError, first_line
from .torch_runner import TorchRunner, torch_device


class TorchScriptRunner(TorchRunner):
    """A `torch.jit.ScriptModule`, run exactly as the eager reference is (same device handling and call)."""

    backend = "torchscript"

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu") -> TorchScriptRunner:  # type: ignore[override]
        """Card and facts are read from the archive's extra files before torch loads the module."""
        import torch

        path = Path(path)
        card, facts = read_artifact(path, "torchscript")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
                module = torch.jit.load(str(path), map_location=torch_device(device))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelFormatError(f"{path}: not a readable TorchScript archive "
                                   f"({first_line(exc)})") from None
        return cls(module, card, source=str(path), device=device, facts=facts)

    def close(self) -> None:
        self.model = None
