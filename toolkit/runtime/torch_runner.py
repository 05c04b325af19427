"""Eager PyTorch from a checkpoint: the reference every export is verified against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactFacts, card_input, card_output
from ..card import ModelCard, load_sidecar, resolve_card
from ..checkpoint import ArchInfo, LoadedCheckpoint, load_checkpoint, load_strict, resolve_architecture
from ..errors import BackendUnavailableError
from .base import Runner


def torch_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda needs a CUDA GPU and driver; none is visible here "
                                      "(use --device cpu)")
    return torch.device(device)


def load_state_into(model: Any, state: dict[str, Any]) -> None:
    """Strict load with one readable message (the same fit report `toolkit validate` shows)."""
    load_strict(model, state)


def build_from_checkpoint(
    ckpt: LoadedCheckpoint, *, arch: str | None = None, card_flags: dict[str, Any] | None = None,
    preset_name: str | None = None,
) -> tuple[Any, ModelCard, ArchInfo]:
    """Network with weights loaded, its resolved card and the architecture facts."""
    from ..archs import build_model

    info = resolve_architecture(ckpt.state_dict, arch)
    card = resolve_card(
        arch=info.arch, num_classes=info.num_classes, stem=info.spec.stem,
        flags={"shortcut": info.shortcut, "source_sha256": ckpt.sha256, **(card_flags or {})},
        card=ckpt.card or load_sidecar(ckpt.path), preset_name=preset_name,
    )
    model = build_model(info.arch, info.num_classes, shortcut=info.shortcut)
    load_state_into(model, ckpt.state_dict)
    return model.eval(), card, info


class TorchRunner(Runner):
    """Eager `nn.Module` in eval mode under `torch.inference_mode`."""

    backend = "torch"

    def __init__(self, model: Any, card: ModelCard, *, source: str, device: str = "cpu",
                 facts: ArtifactFacts | None = None) -> None:
        super().__init__(card, source=source, device=device, facts=facts)
        import torch

        self._torch = torch
        self._device = torch_device(device)
        self.model = model.to(self._device).eval()

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", arch: str | None = None,
             allow_pickle: bool = False, card_flags: dict[str, Any] | None = None) -> TorchRunner:
        """A checkpoint: `arch` overrides the inferred architecture, `allow_pickle` permits pickled code
        (trusted files only), `card_flags` override card fields (CLI flag > card > preset)."""
        ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
        model, card, _ = build_from_checkpoint(ckpt, arch=arch, card_flags=card_flags)
        facts = ArtifactFacts("checkpoint", toolkit_version=None, inputs=(card_input(card),),
                              outputs=(card_output(card),))
        return cls(model, card, source=str(path), device=device, facts=facts)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self._device))
        return out.float().cpu().numpy()
