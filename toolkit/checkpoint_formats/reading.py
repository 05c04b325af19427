"""Reading a weights file into Python objects, never running code: torch.save archives and safetensors.

`torch.load(weights_only=True)` reads both of torch's formats: the zip archive (PyTorch >= 1.6) and
the older single pickle followed by raw storages (`_use_new_zipfile_serialization=False`, and every
file of the PyTorch 0.x era). Storages remember the device they were saved from ("cuda:0" for a
model trained on a GPU); they are restored on the CPU, and the locations are reported.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..card import ModelCard
from ..errors import CheckpointError, DataError

SAFETENSORS_CARD_KEY = "toolkit.card"
# Plain data classes a training script saves beside its weights that a weights_only load may build:
# timm's train.py saves its argparse.Namespace as `args`. Unpickling one sets attributes, nothing else.
SAFE_DATA_CLASSES = (argparse.Namespace,)
Note = tuple[str, str]


@dataclass
class RawFile:
    """What a weights file holds, before any unwrapping."""

    data: Any
    source: str  # "torch" | "safetensors"
    card: ModelCard | None = None  # a card in the safetensors metadata
    notes: list[Note] = field(default_factory=list)


def read_weights_file(path: Path, allow_pickle: bool) -> RawFile:
    """Decided by content, not only the name (a `.bin` may be either format)."""
    if path.suffix == ".safetensors" or _safetensors_content(path):
        tensors, card = _load_safetensors(path)
        return RawFile(tensors, "safetensors", card)
    data, locations = _load_torch(path, allow_pickle)
    notes = []
    if not _is_zip(path):
        notes.append(("legacy_format", "saved in PyTorch's pre-1.6 format (a pickle, not a zip archive); "
                                       "read by torch.load as PyTorch reads it"))
    devices = sorted(loc for loc in locations if loc != "cpu")
    if devices:
        notes.append(("storage_location", f"tensors were saved on {', '.join(devices)}; "
                                          "loaded onto the CPU"))
    return RawFile(data, "torch", notes=notes)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _load_torch(path: Path, allow_pickle: bool) -> tuple[Any, set[str]]:
    """torch.load onto the CPU, recording each storage's saved location (`map_location` as a function)."""
    import torch

    locations: set[str] = set()

    def to_cpu(storage: Any, location: str) -> Any:  # storages are read into CPU memory first
        locations.add(str(location)[:40])
        return storage

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(SAFE_DATA_CLASSES)):
            warnings.simplefilter("ignore", UserWarning)  # torch's note on scanning sparse tensors
            data = torch.load(path, map_location=to_cpu, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            raise CheckpointError(f"{path}: cannot unpickle: {exc}") from None
        raise CheckpointError(
            f"{path} carries pickled code or objects that a safe load refuses ({_unsafe_globals(path)}); "
            "nothing was executed. If you trust its source, rerun with --allow-pickle"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, ImportError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
        ) from None
    return data, locations


def _unsafe_globals(path: Path) -> str:
    """Name what the pickle wants to import (read without executing it), for the refusal message."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        names = get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to enrich a message
        return "unknown objects"
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "unknown objects"


def _safetensors_content(path: Path) -> bool:
    from ..sniff import is_safetensors_head

    with path.open("rb") as handle:
        return is_safetensors_head(handle.read(16))


def _load_safetensors(path: Path) -> tuple[dict[str, Any], ModelCard | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, embedded_card(metadata.get(SAFETENSORS_CARD_KEY), path)


def embedded_card(value: Any, path: Path) -> ModelCard | None:
    """The card a checkpoint carries (JSON text or a dict), checked like any other card."""
    if value is None:
        return None
    try:
        return ModelCard.from_json(value) if isinstance(value, (str, bytes)) else ModelCard.from_dict(value)
    except DataError as exc:
        raise CheckpointError(f"{path}: its embedded model card is unusable: {exc}") from None
