"""What PyTorch's own strict load accepts beyond the exact keys, and what a training script saved beside them.

- BatchNorm's `num_batches_tracked` counter arrived in PyTorch 0.4.1 (BatchNorm `_version = 2`).
  `_NormBase._load_from_state_dict` (torch/nn/modules/batchnorm.py) fills a missing counter with
  `tensor(0, dtype=long)` when the module's saved version is None or < 2, i.e. when the state_dict's
  `_metadata` is absent (PyTorch < 0.4, safetensors, any rebuilt dict) or records version 1.
  `fill_bn_counters` applies exactly that rule, so strict loading accepts what `load_state_dict`
  accepts, and no more.
- Weights in float16/bfloat16 (common on the Hugging Face Hub) and float64 load: `load_state_dict`
  copies them into the float32 parameters. Other floating types (float8_*, float4) are refused in one
  line: copying them silently would not compute what their producer meant.
- `recorded_extras` keeps the accuracy, epoch and arch a training script stored beside the weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

Note = tuple[str, str]
COUNTER = "num_batches_tracked"
RUNNING_VAR = "running_var"
BN_COUNTERS_VERSION = 2  # torch/nn/modules/batchnorm.py: _NormBase._version
# Accuracy-like names (best_prec1, best_acc1, best_acc, acc, prec@1, top1, val_accuracy, ...) and a few facts.
_RECORDED_NAMES = re.compile(r"^(epoch|arch|global_step|metric|best_metric)$"
                             r"|(^|_)(prec|acc|accuracy|top)([-_@]?[15])?$", re.IGNORECASE)
MAX_RECORDED_TEXT = 200


def fill_bn_counters(tensors: dict[str, Any], metadata: Mapping[str, Any] | None,
                     source: str) -> list[Note]:
    """Add each BatchNorm's missing `num_batches_tracked` (0) where PyTorch's load would; returns notes."""
    import torch

    filled = []
    for key in [k for k in tensors if k.endswith(f".{RUNNING_VAR}")]:
        module = key[: -len(RUNNING_VAR) - 1]
        counter = f"{module}.{COUNTER}"
        if counter in tensors or f"{module}.running_mean" not in tensors:
            continue
        if _saved_version(metadata, module) < BN_COUNTERS_VERSION:
            tensors[counter] = torch.tensor(0, dtype=torch.long)
            filled.append(counter)
    if not filled:
        return []
    why = ("not stored in safetensors files" if source == "safetensors" and metadata is None
           else "saved before PyTorch 0.4.1")
    return [(COUNTER, f"{len(filled)} BatchNorm counters missing ({why}); filled in as PyTorch's own "
                      "load does")]


def _saved_version(metadata: Mapping[str, Any] | None, module: str) -> int:
    """The module's `version` in the state_dict's `_metadata`; 0 where none is recorded (as torch's None)."""
    entry = metadata.get(module) if metadata is not None else None
    version = entry.get("version") if isinstance(entry, Mapping) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def module_metadata(mapping: Any) -> Mapping[str, Any] | None:
    """The `_metadata` torch.save keeps on a state_dict (module path -> {"version": n}), if any."""
    metadata = getattr(mapping, "_metadata", None)
    return metadata if isinstance(metadata, Mapping) else None


def _readable_floats() -> tuple[Any, ...]:
    import torch

    return torch.float32, torch.float16, torch.bfloat16, torch.float64


def _integers() -> tuple[Any, ...]:
    import torch

    return torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def check_dtypes(tensors: Mapping[str, Any], path: Path) -> list[Note]:
    """Refuse dtypes no float32 network computes with; note weights stored in another float type."""
    import torch

    floats, integers = _readable_floats(), _integers()
    stored: dict[str, int] = {}
    for key, value in tensors.items():
        if value.dtype in floats:
            if value.dtype != torch.float32:
                stored[dtype_name(value.dtype)] = stored.get(dtype_name(value.dtype), 0) + 1
        elif value.dtype not in integers:
            name = dtype_name(value.dtype)
            raise CheckpointError(f"{path}: tensor {key!r} is stored as {name}; weights load from float32, "
                                  f"float16, bfloat16 or float64 (convert the {name} weights first)")
    if not stored:
        return []
    listed = ", ".join(f"{name} ({count} tensors)" for name, count in sorted(stored.items()))
    return [("stored_dtype", f"weights stored as {listed}: computed in float32")]


def recorded_extras(wrapper: Mapping[Any, Any] | None) -> dict[str, Any]:
    """Accuracy, epoch and arch saved beside the weights (keys as saved), as plain strings and numbers."""
    if wrapper is None:
        return {}
    recorded: dict[str, Any] = {}
    for key, value in wrapper.items():
        if isinstance(key, str) and _RECORDED_NAMES.search(key):
            plain = _plain(value)
            if plain is not None:
                recorded[key] = plain
    return recorded


def _plain(value: Any) -> str | int | float | None:
    """A string, an int, a finite float or a one-element tensor's number; anything else is not shown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value[:MAX_RECORDED_TEXT]
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1 and not getattr(value, "is_complex", lambda: False)():
        number = value.item()
        return _plain(number)
    return None
