"""ModelCard: the one source of truth about a model.

Everything that turns pixels into logits and logits into answers lives here: architecture, class
names, input size, normalisation and the resize/crop policy. `num_classes` is derived from the
class names (as torchvision derives it from `weights.meta["categories"]`), never stored twice.
Every artifact carries its card (ONNX metadata, TorchScript extra files, sidecar JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DataError, ToolkitError, UsageError
from .fileio import atomic_write_text
from .paths import read_bytes_bounded

CARD_SUFFIX = ".card.json"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
SHORTCUTS = ("A", "B")

# Limits (README "Limits and safety"): a card is read from files anyone may hand us, and its sizes
# drive allocations (class names, the network's head, resized images), so each is bounded here.
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 1_000
MAX_INPUT_SIDE = 4_096  # input height/width in pixels
MAX_RESIZE_SIZE = 8_192
MAX_CARD_BYTES = 16 * 1024 * 1024  # a card with 100,000 long class names still fits
MAX_CARD_DEPTH = 32  # JSON nesting; a card needs 4
MAX_TEXT_CHARS = 1_000  # arch, version, sha256 and other single-line fields


class CardError(DataError):
    """A model card is malformed: a missing, mistyped or out-of-range field, or JSON too large/deep."""


_JSON_TOKENS = re.compile(r'["\\\[\]{}]')


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text, in one linear pass without parsing.

    Only quotes, backslashes and brackets are visited; brackets inside strings do not count.
    """
    depth = deepest = 0
    in_string = False
    skip = -1  # the position a backslash escapes
    for match in _JSON_TOKENS.finditer(text):
        char, where = match.group(), match.start()
        if where == skip:
            continue
        if in_string:
            if char == "\\":
                skip = where + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json_bounded(text: str | bytes, *, max_bytes: int, max_depth: int, what: str = "JSON",
                      error: type[ToolkitError] = CardError) -> Any:
    """json.loads with limits checked first: size, nesting depth, and no NaN/Infinity.

    The standard parser recurses once per level (100,000 levels -> RecursionError) and accepts the
    non-standard NaN/Infinity tokens that make the output invalid JSON again; both are refused here
    with `error` naming `what`. Reused for every JSON that comes out of an artifact.
    """
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise error(f"{what} is malformed: {size} bytes is over the limit of {max_bytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is malformed: not UTF-8 ({exc.reason})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{what} is malformed: nested {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {exc}") from None


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or type(value).__name__.startswith(("int", "uint"))  # numpy integers


def _is_name(value: Any) -> bool:
    return isinstance(value, str) or _is_int(value)


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float) or type(value).__name__.startswith("float")


def _text(value: Any, name: str, problems: list[str], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
        problems.append(f"{name} must be a non-empty string of at most {MAX_TEXT_CHARS} characters, "
                        f"got {_show(value)}")


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _card_problems(card: ModelCard) -> list[str]:
    """Every type and range problem of a card's fields (empty when the card is good)."""
    problems: list[str] = []
    _text(card.arch, "arch", problems)
    names = card.class_names
    if not names:
        problems.append("class_names is empty")
    elif len(names) > MAX_CLASSES:
        problems.append(f"{len(names)} class names is over the limit of {MAX_CLASSES}")
    elif any(len(n) > MAX_CLASS_NAME_CHARS for n in names):
        problems.append(f"class names must be at most {MAX_CLASS_NAME_CHARS} characters")
    size = card.input_size
    if len(size) != 3 or size[0] != 3 or min(size) < 1:
        problems.append(f"input_size must be (3, H, W), got {size}")
    elif max(size[1:]) > MAX_INPUT_SIDE:
        problems.append(f"input_size {size} is over the limit of {MAX_INPUT_SIDE} pixels a side")
    if len(card.mean) != 3 or len(card.std) != 3:
        problems.append("mean and std need 3 values (RGB)")
    elif not all(math.isfinite(v) for v in (*card.mean, *card.std)):
        problems.append(f"mean and std must be finite numbers, got {card.mean} and {card.std}")
    elif min(card.std) <= 0:
        problems.append(f"std must be positive, got {card.std}")
    if card.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if not 1 <= card.resize_size <= MAX_RESIZE_SIZE:
        problems.append(f"resize_size must be 1..{MAX_RESIZE_SIZE}, got {card.resize_size}")
    elif len(size) == 3 and card.resize_size < min(size[1:]):
        problems.append(f"resize_size {card.resize_size} is smaller than the input {size[1:]}")
    if card.shortcut is not None and card.shortcut not in SHORTCUTS:
        problems.append(f"shortcut must be A, B or null, got {_show(card.shortcut)}")
    _text(card.source_sha256, "source_sha256", problems, optional=True)
    _text(card.toolkit_version, "toolkit_version", problems)
    return problems


def _coerce(name: str, value: Any, check: Any, kind: str, length: int | None = None) -> tuple[Any, ...]:
    """A list/tuple whose items pass `check`, as a tuple; else a CardError naming the field."""
    is_sequence = hasattr(value, "__len__") and hasattr(value, "__iter__")
    if isinstance(value, (str, bytes, Mapping)) or not is_sequence:
        raise CardError(f"invalid model card: {name} must be a list of {kind}, got {_show(value)}")
    if name == "class_names" and len(value) > MAX_CLASSES:  # before touching a single item
        raise CardError(f"invalid model card: {len(value)} class names is over the limit of {MAX_CLASSES}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise CardError(f"invalid model card: {name} needs {length} {kind}, got {_show(value)}")
    bad = next((v for v in items if not check(v)), _MISSING)
    if bad is not _MISSING:
        raise CardError(f"invalid model card: {name} must be a list of {kind}, found {_show(bad)}")
    return items


_MISSING = object()

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
        # Types first (a card comes from files anyone may hand us), then ranges: one CardError
        # that names every problem, raised wherever a card is built, whatever it was read from.
        names = _coerce("class_names", self.class_names, _is_name, "strings")
        object.__setattr__(self, "class_names", tuple(str(c) for c in names))
        object.__setattr__(self, "input_size", tuple(int(v) for v in _coerce(
            "input_size", self.input_size, _is_int, "integers", 3)))
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in _coerce(
                name, getattr(self, name), _is_real, "numbers", 3)))
        for name in ("resize_size",):
            if not _is_int(getattr(self, name)):
                raise CardError(f"invalid model card: {name} must be an integer, "
                                f"got {_show(getattr(self, name))}")
        object.__setattr__(self, "resize_size", int(self.resize_size))
        if not isinstance(self.interpolation, str):
            raise CardError("invalid model card: interpolation must be a string, "
                            f"got {_show(self.interpolation)}")
        if not isinstance(self.extra, Mapping):
            raise CardError(f"invalid model card: extra must be an object, got {_show(self.extra)}")
        object.__setattr__(self, "extra", dict(self.extra))
        problems = _card_problems(self)
        if problems:
            raise CardError("invalid model card: " + "; ".join(problems))

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
        if not isinstance(data, Mapping):
            raise CardError(f"model card must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and k != "num_classes")
        kwargs = {k: v for k, v in data.items() if k in known}
        if unknown:  # keep what newer versions wrote instead of dropping it
            extra = kwargs.get("extra") or {}
            if not isinstance(extra, Mapping):
                raise CardError(f"invalid model card: extra must be an object, got {_show(extra)}")
            kwargs["extra"] = {**dict(extra), **{k: data[k] for k in unknown}}
        if "arch" not in kwargs or "class_names" not in kwargs:
            raise CardError("model card lacks 'arch' or 'class_names'")
        card = cls(**kwargs)
        if "num_classes" in data:
            declared = data["num_classes"]
            if not _is_int(declared):
                raise CardError(f"invalid model card: num_classes must be an integer, got {_show(declared)}")
            if int(declared) != card.num_classes:
                raise CardError(
                    f"model card says num_classes={declared} but lists {card.num_classes} class names"
                )
        return card

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        data = load_json_bounded(text, max_bytes=MAX_CARD_BYTES, max_depth=MAX_CARD_DEPTH, what="model card")
        if not isinstance(data, dict):
            raise CardError("model card must be a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        return cls.from_json(read_bytes_bounded(path, MAX_CARD_BYTES, error=CardError, what="model card"))


def sidecar_path(artifact: str | Path) -> Path:
    """`model.pt` -> `model.pt.card.json`: the card that travels beside an artifact."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + CARD_SUFFIX)


def load_sidecar(artifact: str | Path) -> ModelCard | None:
    path = sidecar_path(artifact)
    return ModelCard.load(path) if path.exists() else None  # a FIFO or device here is refused, not skipped


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
    if not path.exists():
        raise UsageError(f"--classes {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = read_bytes_bounded(path, MAX_CARD_BYTES, error=UsageError, what="--classes file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--classes {spec}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        names = load_json_bounded(text, max_bytes=MAX_CARD_BYTES, max_depth=1, what=f"--classes {spec}",
                                  error=UsageError)
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool)
                                                  for n in names):
            raise UsageError(f"--classes {spec}: expected a JSON list of class names")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UsageError(f"--classes {spec}: no class names found")
    if len(names) > MAX_CLASSES:
        raise UsageError(f"--classes {spec}: {len(names)} names is over the limit of {MAX_CLASSES}")
    return tuple(str(n) for n in names)


def default_preset_for(stem: str, num_classes: int) -> str:
    """The preset whose preprocessing fits an architecture when nothing else says."""
    if stem == "cifar":
        return "cifar100" if num_classes == 100 else "cifar10"
    return "imagenet"


def generic_class_names(num_classes: int) -> tuple[str, ...]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise CardError(f"{num_classes} classes is outside 1..{MAX_CLASSES} (the limit on a model's classes)")
    return tuple(f"class_{i}" for i in range(num_classes))
