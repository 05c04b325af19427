"""Card fields out of a library's config: each value checked, an unusable one noted and left out.

A config comes from files anyone may hand us, so nothing is trusted: a value that is not what the
ModelCard field needs becomes a note ("ignored") and the field falls to the next layer of the card's
precedence, rather than failing the whole load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..card import INTERPOLATIONS, MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_INPUT_SIDE, MAX_RESIZE_SIZE

Note = tuple[str, str]
# PIL.Image.Resampling values, as transformers' image processors save `resample`: NEAREST 0, LANCZOS 1,
# BILINEAR 2, BICUBIC 3 (BOX 4 and HAMMING 5 have no card name).
PIL_RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class CardFields:
    """Card fields read from one config (ModelCard names), and a note for each value left out."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "timm's config.json"
        self.fields: dict[str, Any] = {}
        self.notes: list[Note] = []

    def put(self, name: str, value: Any, raw: Any, key: str) -> None:
        """Set `name` to `value` (parsed from `raw`, the config's `key`); None notes `raw` as unusable."""
        if raw is None:
            return
        if value is None:
            self.note("config_ignored", f"{self.what}: {key} = {_show(raw)} cannot be the card's {name}; "
                                        "ignored")
        else:
            self.fields[name] = value

    def note(self, code: str, message: str) -> None:
        self.notes.append((code, message))


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rgb(value: Any, *, positive: bool = False) -> tuple[float, float, float] | None:
    """Three finite numbers (a mean or, positive, a std)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    numbers = [_real(v) for v in value]
    if any(n is None or (positive and n <= 0) for n in numbers):
        return None
    return (float(numbers[0]), float(numbers[1]), float(numbers[2]))  # type: ignore[arg-type]


def side(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INPUT_SIDE \
        else None


def input_size(value: Any) -> tuple[int, int, int] | None:
    """timm's (3, H, W)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or value[0] != 3:
        return None
    height, width = side(value[1]), side(value[2])
    return (3, height, width) if height and width else None


def interpolation(value: Any) -> str | None:
    """A card interpolation name from a name ("bicubic") or a PIL resampling number (3)."""
    if isinstance(value, str):
        return value.lower() if value.lower() in INTERPOLATIONS else None
    if isinstance(value, int) and not isinstance(value, bool):
        return PIL_RESAMPLING.get(value)
    return None


def resize_for_crop(size: int, crop_pct: Any) -> int | None:
    """floor(size / crop_pct): timm's transforms_imagenet_eval and transformers' ConvNext resize alike."""
    pct = _real(crop_pct)
    if pct is None or not 0 < pct <= 1:
        return None
    resize = math.floor(size / pct)
    return resize if resize <= MAX_RESIZE_SIZE else None


def class_names(value: Any, count: int | None) -> tuple[str, ...] | None:
    """A list of names, or {index: name} covering 0..n-1 (timm's label_names, transformers' id2label).

    `count` (the head's outputs) must match when known.
    """
    if isinstance(value, Mapping):
        try:
            indexed = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if sorted(indexed) != list(range(len(indexed))):
            return None
        value = [indexed[i] for i in range(len(indexed))]
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_CLASSES:
        return None
    if count is not None and len(value) != count:
        return None
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_CLASS_NAME_CHARS for v in value):
        return None
    return tuple(value)
