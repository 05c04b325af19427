"""The layers of a card and their one precedence; the card fields given on the command line.

`resolve_card` merges a checkpoint's card from its layers (preset, recognised public weights, the
checkpoint's own config, the card embedded in or beside it, flags).

`--classes`, `--mean`, `--std`, `--input-size`, `--resize` / `--crop-pct` and `--interpolation` are
the same on every command that builds a card. They are parsed here once (text -> typed values, one
UsageError naming the flag), and applied here once: to the layers of a checkpoint's card
(`resolve_card`) or on top of the card an exported artifact carries (`override_card`).

`--crop-pct` is timm's way of saying the resize: `resize = floor(input / crop_pct)`
(timm.data.transforms_factory.transforms_imagenet_eval), computed against the final input size, so
`--crop-pct 0.875 --input-size 224` gives 256 as torchvision's presets do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .card import (
    INTERPOLATIONS,
    PRESETS,
    ModelCard,
    default_preset_for,
    generic_class_names,
    preset,
    read_class_names,
)
from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import ArchInfo, LoadedCheckpoint
    from .known_weights import KnownWeights

# notices for the person at the terminal (the CLI shows them as dim lines on stderr)
log = logging.getLogger("toolkit.notice")

# card field -> the flag that sets it (for messages)
FLAG_OF_FIELD = {"class_names": "--classes", "mean": "--mean", "std": "--std", "input_size": "--input-size",
                 "resize_size": "--resize/--crop-pct", "interpolation": "--interpolation"}


def _triple(text: str, flag: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} takes three numbers (R,G,B), got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} takes three finite numbers (R,G,B), got {text!r}")
    if any(v > 1.0 for v in values):  # 123.675,116.28,103.53: the 0-255 convention
        values = tuple(v / 255.0 for v in values)
    return values  # type: ignore[return-value]


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise UsageError(f"--input-size takes N or HxW in pixels, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"--input-size takes N or HxW in positive pixels, got {text!r}")
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class CardFlags:
    """What the user said about the card; None means "not given". Parsed, not yet applied."""

    classes: str | None = None  # a preset name (cifar10, cifar100, imagenet) or a file of names
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: tuple[int, int] | None = None  # (H, W)
    resize_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    @classmethod
    def parse(cls, *, classes: str | None = None, mean: str | None = None, std: str | None = None,
              input_size: str | None = None, resize: int | None = None, crop_pct: float | None = None,
              interpolation: str | None = None) -> CardFlags:
        """The flags' text -> typed values; a malformed or contradictory flag is one UsageError."""
        if resize is not None and crop_pct is not None:
            raise UsageError("--resize and --crop-pct both set the resize: give one")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise UsageError(f"--crop-pct is a fraction in (0, 1], got {crop_pct}")
        if resize is not None and resize < 1:
            raise UsageError(f"--resize takes a positive size in pixels, got {resize}")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise UsageError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}")
        std_values = _triple(std, "--std") if std is not None else None
        if std_values is not None and min(std_values) <= 0:
            raise UsageError(f"--std must be positive, got {std}")
        if classes is not None:
            read_class_names(classes)  # a missing file or a bad list fails now, naming the flag
        return cls(classes=classes, mean=_triple(mean, "--mean") if mean is not None else None,
                   std=std_values, input_size=_size(input_size) if input_size is not None else None,
                   resize_size=resize, crop_pct=crop_pct, interpolation=interpolation)

    def __bool__(self) -> bool:
        return any(value is not None for value in vars(self).values())

    @property
    def preset(self) -> str | None:
        """`--classes cifar100` also names the preset whose preprocessing fits (the lowest layer)."""
        return self.classes if self.classes in PRESETS else None

    def fields(self, below: Mapping[str, Any]) -> dict[str, Any]:
        """The card fields these flags set, given the merged layers `below` (for --crop-pct)."""
        out: dict[str, Any] = {}
        if self.classes is not None:
            out["class_names"] = read_class_names(self.classes)
        if self.mean is not None:
            out["mean"] = self.mean
        if self.std is not None:
            out["std"] = self.std
        if self.input_size is not None:
            out["input_size"] = (3, *self.input_size)
        if self.interpolation is not None:
            out["interpolation"] = self.interpolation
        if self.resize_size is not None:
            out["resize_size"] = self.resize_size
        elif self.crop_pct is not None:
            size = out.get("input_size", below.get("input_size", (3, 224, 224)))
            out["resize_size"] = math.floor(min(size[1:]) / self.crop_pct)
        elif self.input_size is not None and "resize_size" in below:
            # a new input size keeps the layers' crop ratio (CIFAR 32/32 stays uncropped)
            old = min(below["input_size"][1:]) if "input_size" in below else min(self.input_size)
            out["resize_size"] = max(min(self.input_size), round(below["resize_size"] * min(self.input_size)
                                                                 / old))
        return out


def check_class_count(fields: Mapping[str, Any], num_classes: int, flags: CardFlags) -> None:
    """--classes must list as many names as the head has outputs."""
    names = fields.get("class_names")
    if names is not None and len(names) != num_classes:
        raise UsageError(f"--classes {flags.classes} lists {len(names)} classes but the model has "
                         f"{num_classes} outputs")


def override_card(card: ModelCard, flags: CardFlags | None, where: str) -> ModelCard:
    """The card an artifact carries with the user's flags on top; one line names what they override."""
    if not flags:
        return card
    fields = flags.fields(card.to_dict())
    check_class_count(fields, card.num_classes, flags)
    announce_overrides(card, fields, where)
    return card.replace(**fields)


def announce_overrides(card: ModelCard, fields: Mapping[str, Any], where: str) -> None:
    """One notice naming the flags that change what the card in (or beside) `where` says."""
    data = card.to_dict()
    changed = sorted({FLAG_OF_FIELD[name] for name, value in fields.items()
                      if name in FLAG_OF_FIELD and _as_tuple(value) != _as_tuple(data[name])})
    if changed:
        log.warning("note: %s %s the card of %s", ", ".join(changed),
                    "overrides" if len(changed) == 1 else "override", where)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def resolve_card(
    *,
    arch: str,
    num_classes: int,
    stem: str,
    flags: CardFlags | Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
    config: Mapping[str, Any] | None = None,
    known: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
    preset_name: str | None = None,
) -> ModelCard:
    """Merge one card with one precedence (README "Bring your weights"), later layers winning:

    preset < recognised public weights (`known`) < the checkpoint's own config (`config`: timm's
    pretrained_cfg, transformers' preprocessor_config) < the card embedded in or beside it (`card`)
    < command-line flags (`flags`: a `CardFlags`, or raw card fields as a mapping).

    `facts` are what the tensors and the file say (shortcut option, sha256): they hold whatever the
    layers claim. `preset_name` defaults to the preset that fits the stem and head size (or the one
    `--classes` names). Class names of a layer are used only when their count matches the head;
    otherwise generic names. Every layer holds ModelCard field names.
    """
    user = flags if isinstance(flags, CardFlags) else None
    raw_flags = {k: v for k, v in flags.items() if v is not None} if isinstance(flags, Mapping) else {}
    from_card = {k: v for k, v in (card.to_dict() if card else {}).items() if k != "num_classes"}
    chosen_preset = preset_name or (user.preset if user else None) or default_preset_for(stem, num_classes)
    merged: dict[str, Any] = {"arch": arch}
    for layer in (preset(chosen_preset), known or {}, config or {}, from_card, raw_flags):  # later layers win
        names = layer.get("class_names")
        if names is not None and len(names) != num_classes:
            layer = {k: v for k, v in layer.items() if k != "class_names"}
        merged.update(layer)
    if user is not None:
        fields = user.fields(merged)
        check_class_count(fields, num_classes, user)
        merged.update(fields)
    if len(merged.get("class_names", ())) != num_classes:
        merged["class_names"] = generic_class_names(num_classes)
    merged.update(facts or {})
    merged["arch"] = raw_flags.get("arch", arch)
    merged["toolkit_version"] = __version__
    return ModelCard.from_dict(merged)


def checkpoint_card(ckpt: LoadedCheckpoint, info: ArchInfo,
                    flags: CardFlags | Mapping[str, Any] | None = None,
                    *, sidecar: bool = True) -> tuple[ModelCard, KnownWeights | None]:
    """A checkpoint's card from all its layers, and the public weights it was recognised as (if any).

    The one place that gathers the layers of a checkpoint: the torch runner and `toolkit validate`
    both call it, so the two can never disagree about a model's preprocessing. `sidecar=False` leaves
    out a `*.card.json` beside the file (validate does, after finding it malformed).
    """
    from .card import load_sidecar
    from .known_weights import recognise

    known = recognise(ckpt.sha256, info.arch)
    stored = ckpt.card or (load_sidecar(ckpt.path) if sidecar else None)
    card = resolve_card(
        arch=info.arch, num_classes=info.num_classes, stem=info.spec.stem, flags=flags, card=stored,
        config=ckpt.config, known=known.card_fields() if known else None,
        facts={"shortcut": info.shortcut, "source_sha256": ckpt.sha256},
    )
    if stored is not None and isinstance(flags, CardFlags):
        announce_overrides(stored, flags.fields(stored.to_dict()), str(ckpt.path))
    return card, known
