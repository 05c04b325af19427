"""ModelCard: the one source of truth about a model.

Everything that turns pixels into logits and logits into answers lives here: architecture, class
names, input size, normalisation and the resize/crop policy. `num_classes` is derived from the
class names (as torchvision derives it from `weights.meta["categories"]`), never stored twice.
Every artifact carries its card (ONNX metadata, TorchScript extra files, sidecar JSON).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DataError, UsageError
from .fileio import atomic_write_text

CARD_SUFFIX = ".card.json"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in torchvision's order (shipped as a text file)."""
    text = resources.files("toolkit.resources").joinpath("imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


@dataclass(frozen=True)
class ModelCard:
    """What a model is and how to feed it. Immutable; use `replace()` to derive a new one."""

    arch: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_size: int = 256
    interpolation: str = "bilinear"
    shortcut: str | None = None
    source_sha256: str | None = None
    toolkit_version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "extra", dict(self.extra))
        problems = []
        if not self.class_names:
            problems.append("class_names is empty")
        if len(self.input_size) != 3 or self.input_size[0] != 3 or min(self.input_size) < 1:
            problems.append(f"input_size must be (3, H, W), got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need 3 values (RGB)")
        elif min(self.std) <= 0:
            problems.append(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if self.resize_size < min(self.input_size[1:]):
            problems.append(f"resize_size {self.resize_size} is smaller than the input {self.input_size[1:]}")
        if problems:
            raise UsageError("invalid model card: " + "; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("class_names", "input_size", "mean", "std"):
            data[key] = list(data[key])
        data["num_classes"] = self.num_classes  # informative only; derived again on load
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"num_classes"})
        kwargs = {k: v for k, v in data.items() if k in known}
        if unknown:  # keep what newer versions wrote instead of dropping it
            kwargs["extra"] = {**dict(kwargs.get("extra") or {}), **{k: data[k] for k in unknown}}
        if "arch" not in kwargs or "class_names" not in kwargs:
            raise DataError("model card lacks 'arch' or 'class_names'")
        if "num_classes" in data and int(data["num_classes"]) != len(kwargs["class_names"]):
            raise DataError(
                f"model card says num_classes={data['num_classes']} but lists "
                f"{len(kwargs['class_names'])} class names"
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"model card is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataError("model card must be a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise DataError(f"cannot read model card {path}: {exc.strerror}") from None
        return cls.from_json(text)


def sidecar_path(artifact: str | Path) -> Path:
    """`model.pt` -> `model.pt.card.json`: the card that travels beside an artifact."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + CARD_SUFFIX)


def load_sidecar(artifact: str | Path) -> ModelCard | None:
    path = sidecar_path(artifact)
    return ModelCard.load(path) if path.is_file() else None


# --- presets and the one resolver -------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "class_names": CIFAR10_CLASSES,
        "input_size": (3, 32, 32),
        "resize_size": 32,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "interpolation": "bilinear",
    },
    "cifar100": {
        "class_names": CIFAR100_CLASSES,
        "input_size": (3, 32, 32),
        "resize_size": 32,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "interpolation": "bilinear",
    },
    "imagenet": {
        "class_names": None,  # filled lazily: 1000 names from a resource file
        "input_size": (3, 224, 224),
        "resize_size": 256,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    if values["class_names"] is None:
        values["class_names"] = imagenet_classes()
    return values


def read_class_names(spec: str) -> tuple[str, ...]:
    """`--classes`: a preset name, or a file with one name per line (or a JSON list)."""
    if spec in PRESETS:
        return tuple(preset(spec)["class_names"])
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--classes {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    text = path.read_text("utf-8")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--classes {spec}: invalid JSON list: {exc}") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UsageError(f"--classes {spec}: no class names found")
    return tuple(str(n) for n in names)


def default_preset_for(stem: str, num_classes: int) -> str:
    """The preset whose preprocessing fits an architecture when nothing else says."""
    if stem == "cifar":
        return "cifar100" if num_classes == 100 else "cifar10"
    return "imagenet"


def generic_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


def resolve_card(
    *,
    arch: str,
    num_classes: int,
    stem: str,
    flags: Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
    preset_name: str | None = None,
) -> ModelCard:
    """Merge one card with one precedence: CLI flag > card > preset > default.

    `flags` holds card fields given on the command line (None means "not given").
    `preset_name` defaults to the preset that fits the stem and head size. Class names from a
    preset are used only when their count matches the head; otherwise generic names.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    from_card = {k: v for k, v in (card.to_dict() if card else {}).items() if k != "num_classes"}
    chosen_preset = preset_name or default_preset_for(stem, num_classes)
    from_preset = preset(chosen_preset)
    if len(from_preset["class_names"]) != num_classes:
        from_preset["class_names"] = generic_class_names(num_classes)
    merged: dict[str, Any] = {"arch": arch}
    for layer in (from_preset, from_card, given):  # later layers win
        merged.update(layer)
    merged["arch"] = given.get("arch", arch)
    merged["toolkit_version"] = __version__
    return ModelCard.from_dict(merged)
