"""Recognised public weights: publishers' checkpoints by sha256, with the preprocessing they used.

A downloaded torchvision or CIFAR checkpoint carries no card, and its publisher's normalisation is
not always the dataset's own (akamaster's CIFAR-10 ResNets were trained and evaluated with ImageNet's
mean/std). The data file `resources/known_weights.json` lists such files by digest, each with its
publisher's classes, input size, resize, interpolation, mean/std and published top-1, and where each
fact was read. torch.hub names a file after the first 8 hex digits of its sha256 (`resnet50-11ad3fa6.pth`;
torch.hub's `check_hash`), so an entry's digest may be that prefix; the full digest is kept where the
publisher gives it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .card import INTERPOLATIONS, PRESETS, preset
from .errors import DataError

MIN_DIGEST_PREFIX = 8  # torch.hub's convention; shorter would recognise files by accident


@dataclass(frozen=True)
class KnownWeights:
    """One publisher's file: what it is, how it was fed, what it scored, and where that was read."""

    publisher: str
    name: str
    file: str
    sha256: str
    url: str
    arch: str
    classes: str | tuple[str, ...]  # a preset name (imagenet, cifar10, cifar100) or the names themselves
    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    top1: float  # published top-1, percent
    dataset: str  # what the top-1 was measured on
    source: str  # where the facts were read
    shortcut: str | None = None

    @property
    def label(self) -> str:
        return f"{self.publisher} {self.name}"

    def matches(self, digest: str) -> bool:
        """A file's digest against this entry's (either may be the published 8-hex prefix)."""
        digest = digest.lower()
        shorter = min(len(digest), len(self.sha256))
        return shorter >= MIN_DIGEST_PREFIX and digest[:shorter] == self.sha256[:shorter]

    def card_fields(self) -> dict[str, Any]:
        """This entry as a layer of the card (ModelCard field names)."""
        names = tuple(preset(self.classes)["class_names"]) if isinstance(self.classes, str) else self.classes
        return {"class_names": names,
                "input_size": (3, self.input_size, self.input_size), "resize_size": self.resize_size,
                "interpolation": self.interpolation, "mean": self.mean, "std": self.std}

    def summary(self) -> dict[str, Any]:
        return {"publisher": self.publisher, "name": self.name, "top1": self.top1, "dataset": self.dataset,
                "url": self.url, "source": self.source}


def parse_entry(data: Mapping[str, Any]) -> KnownWeights:
    """One entry of the data file, checked: every field present and typed, digests of hex digits."""
    try:
        entry = KnownWeights(
            publisher=str(data["publisher"]), name=str(data["name"]), file=str(data["file"]),
            sha256=str(data["sha256"]).lower(), url=str(data["url"]), arch=str(data["arch"]),
            classes=_classes(data["classes"]), input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]), interpolation=str(data["interpolation"]),
            mean=_triple(data["mean"]), std=_triple(data["std"]), top1=float(data["top1"]),
            dataset=str(data["dataset"]), source=str(data["source"]), shortcut=data.get("shortcut"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"known weights entry {dict(data).get('file', '?')}: {exc!r}") from None
    problems = []
    if len(entry.sha256) < MIN_DIGEST_PREFIX or any(c not in "0123456789abcdef" for c in entry.sha256):
        problems.append(f"sha256 must be at least {MIN_DIGEST_PREFIX} hex digits")
    if isinstance(entry.classes, str) and entry.classes not in PRESETS:
        problems.append(f"classes must be one of {', '.join(PRESETS)} or a list of names")
    if entry.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if entry.shortcut not in (None, "A", "B"):
        problems.append("shortcut must be A, B or null")
    if not entry.resize_size >= entry.input_size >= 1 or not 0 < entry.top1 <= 100:
        problems.append("sizes or top-1 out of range")
    if problems:
        raise DataError(f"known weights entry {entry.file}: " + "; ".join(problems))
    return entry


def _classes(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"classes must be a preset name or a list of names, got {value!r}")
    return tuple(value)


def _triple(value: Any) -> tuple[float, float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(f"expected three numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


@lru_cache(maxsize=1)
def known_weights() -> tuple[KnownWeights, ...]:
    """Every entry of the packaged data file."""
    text = resources.files("toolkit.resources").joinpath("known_weights.json").read_text("utf-8")
    return tuple(parse_entry(entry) for entry in json.loads(text)["weights"])


def recognise(digest: str, arch: str | None = None,
              table: Sequence[KnownWeights] | None = None) -> KnownWeights | None:
    """The public weights whose digest `digest` is (or starts with), and of `arch` when given."""
    for entry in known_weights() if table is None else table:
        if entry.matches(digest) and (arch is None or entry.arch == arch):
            return entry
    return None
