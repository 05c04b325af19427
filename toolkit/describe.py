"""`toolkit info`: what any model is and what its file is, as one flat dict (JSON, or a table).

Above the runtime: a v2 URL is described by asking the server (through its runner), a file or a
Triton model folder by `runtime.registry.read_artifact`, which reads exported files from their
bytes and resolves a checkpoint's card from its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fileio import artifact_size
from .runtime.registry import TRITON_FOLDER_FORMATS, open_model, read_artifact, triton_model_file


def describe_artifact(model: str | Path) -> dict[str, Any]:
    """Path, format, precision, card, inputs/outputs, opset or TensorRT facts, size in bytes."""
    if str(model).startswith(("http://", "https://")):
        with open_model(model, backend="remote") as runner:
            return {"path": str(model), "format": "remote", "card": runner.card.to_dict(),
                    **runner.describe()}
    path = Path(model)
    card, facts = read_artifact(path)
    described = facts.to_dict()
    extra = described.pop("extra")
    info: dict[str, Any] = {"path": str(path), **described,
                            **{k: v for k, v in extra.items() if k not in described}, "card": card.to_dict()}
    if path.is_dir() and facts.format in TRITON_FOLDER_FORMATS:
        target = triton_model_file(path)
        info["triton_model"] = str(target.parent.parent)
        info["model_file"] = str(target)
    info["size_bytes"] = artifact_size(path)
    return info
