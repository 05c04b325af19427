"""Datasets: CIFAR-10/100 (official python format), image folders, image lists, and the sample.

Every dataset yields preprocessed float32 NCHW batches through the one `preprocess` function.
CIFAR batches are pickles, so they are read with a restricted unpickler that only rebuilds numpy
arrays and plain containers: a planted payload in a downloaded batch cannot run.
"""

from __future__ import annotations

import functools
import glob as globmod
import hashlib
import io
import pickle
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import numpy as np

from .card import ModelCard
from .decode_pool import DecodePool, load_uint8
from .errors import DataError, UsageError
from .images import IMAGE_SUFFIXES
from .names import DATASETS
from .paths import read_bytes_bounded, require_dir
from .preprocess import preprocess

SAMPLE_DIR = Path(__file__).parent / "sample" / "digits-batches-py"

class CifarSpec(TypedDict):
    """Where one CIFAR release keeps what, in its official python format."""

    folder: str
    train: list[str]  # glob patterns of the batches
    test: list[str]
    meta: str
    label_key: str
    names_key: str
    url: str
    md5: str


CIFAR: dict[str, CifarSpec] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": ["data_batch_*"],  # five in the official release; the sample has one
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}


# Limits (README "Limits and safety"). The official batches are 31 MB (CIFAR-10) and 155 MB (CIFAR-100
# train); everything read from a batch is bounded by its file size (see `_Budget`).
MAX_PICKLE_BYTES = 1 << 30
MAX_CIFAR_CLASSES = 100_000
CIFAR_ROW = 3 * 32 * 32


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's array rebuild, limited to what numpy's pickles use: an empty ndarray that the next
    `__setstate__` fills from bytes in the file (so an array can never be larger than its bytes)."""
    from numpy._core.multiarray import _reconstruct as rebuild

    if subtype is not np.ndarray or not isinstance(shape, tuple) or not all(
            isinstance(n, int) and 0 <= n <= 1 for n in shape):
        raise pickle.UnpicklingError("refusing an array rebuild that is not numpy's own (an empty ndarray)")
    return rebuild(subtype, shape, dtype)


def _bytes(*args: Any) -> bytes:
    """`bytes()` as Python 2-compatible pickles use it for empty values; `bytes(n)` (n zero bytes
    from a few bytes of pickle) is refused."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("refusing bytes(n): a size, not content")
    return bytes(*args)


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and builtins only; anything else is refused before it runs."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        # protocol >= 5 pickles of arrays (str-keyed batches re-saved with Python 3) rebuild via this
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })
    _WRAPPED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        # protocol-2 pickles written by Python 3 store an empty bytes value (an empty filename, a
        # 0-row array's data) as `bytes()`
        ("builtins", "bytes"): _bytes, ("__builtin__", "bytes"): _bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._WRAPPED:
            return self._WRAPPED[module, name]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _prescan(data: bytes) -> None:
    """Walk the opcodes without building anything: every length prefix must fit in the file
    (a BINBYTES8 claiming 1 TiB) and every memo index must be one the pickler could have
    assigned (a LONG_BINPUT at 2**32 makes the C unpickler allocate and zero a 32 GB memo)."""
    import pickletools

    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if opcode.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg <= count):
                raise pickle.UnpicklingError(f"memo index {arg} out of range")
    except (ValueError, OverflowError) as exc:  # genops: "expected N bytes ... but only M remain"
        raise pickle.UnpicklingError(str(exc).splitlines()[0][:200]) from None


def safe_unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch; bytes keys (Python 2 pickles) become str keys.

    Only a regular file of at most `MAX_PICKLE_BYTES` is read, its opcodes are checked before any
    object is built, and only numpy arrays and plain containers come out.
    """
    data = read_bytes_bounded(path, MAX_PICKLE_BYTES, what="CIFAR file")
    try:
        _prescan(data)
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except MemoryError:
        raise DataError(f"{path}: not a valid CIFAR batch (it asks for more memory than its size allows)"
                        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, RecursionError, UnicodeDecodeError, LookupError) as exc:
        raise DataError(f"{path}: not a valid CIFAR batch ({str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a valid CIFAR batch (found {type(obj).__name__})")
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class _Budget:
    """How many values a batch may expand to: its file size. A legitimate pickle spends at least
    one byte per value (numpy data) or two (a list of ints), so shared references (one row listed
    a million times: a tiny file, a 3 GB array) are refused before numpy sees them."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.left = path, max(size, 1 << 16)

    def spend(self, count: int, what: str) -> None:
        if count > self.left:
            raise DataError(f"{self.path}: not a valid CIFAR batch ({what} expands beyond the file's size)")
        self.left -= count


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        found = ", ".join(sorted(map(str, batch))[:8]) or "nothing"
        raise DataError(f"{path}: not a valid CIFAR batch (no {key!r}; found {found})")
    return batch[key]


def _integers(value: Any, key: str, path: Path, budget: _Budget, width: int | None = None) -> np.ndarray:
    """An integer ndarray (1-D, or rows of `width`) from a list or array, within the budget."""
    what = f"{path}: {key!r}"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise DataError(f"{what} must hold integers, found {value.dtype} values")
        budget.spend(value.size, key)
        array = value
    elif isinstance(value, (list, tuple)):
        # a pickled list spends >= 2 bytes of file per value: charge that, so numpy's 8 bytes per
        # value stay within 4x the file size
        if width is not None:
            if not all(isinstance(r, (list, tuple, np.ndarray)) and len(r) == width for r in value):
                raise DataError(f"{what} must be rows of {width} values")
            budget.spend(2 * len(value) * width, key)
        else:
            budget.spend(2 * len(value), key)
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DataError(f"{what} must hold integers ({str(exc)[:120]})") from None
        if array.size and array.dtype.kind not in "iu":
            raise DataError(f"{what} must hold integers, found {array.dtype.name} values")
        array = array.astype(np.int64) if not array.size else array
    else:
        raise DataError(f"{what} must be a list or an array, found {type(value).__name__}")
    shape = (len(array), width) if width is not None else (len(array),)
    if array.shape != shape and not (array.size == 0 and len(array) == 0):
        expected = f"(N, {width})" if width is not None else "(N,)"
        raise DataError(f"{what}: expected shape {expected}, got {array.shape}")
    return array.reshape(shape)


def _class_names(meta: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    names = _field(meta, key, path)
    if not isinstance(names, (list, tuple)) or not 1 <= len(names) <= MAX_CIFAR_CLASSES:
        raise DataError(f"{path}: {key!r} must be a list of 1..{MAX_CIFAR_CLASSES} class names")
    if not all(isinstance(n, (str, bytes)) and len(n) <= 1000 for n in names):
        raise DataError(f"{path}: {key!r} must hold strings of at most 1000 characters")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) images and int64 (N,) labels from one batch, every field checked."""
    batch = safe_unpickle(path)
    budget = _Budget(path, path.stat().st_size)
    data = _integers(_field(batch, "data", path), "data", path, budget, CIFAR_ROW)
    labels = _integers(_field(batch, label_key, path), label_key, path, budget)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values outside 0..255 (found {data.min()}..{data.max()})")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64, copy=False)


SUBSET_SEED = 0  # `--limit` draws the same images every run


def balanced_indices(labels: np.ndarray, size: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """`size` positions as even across classes as the labels allow, drawn by a seeded generator, ascending.

    Round-robin over per-class shuffled queues (class by class in label order, one image each round),
    so every class gets `size // classes` or one more until a class runs out; what a class lacks the
    others fill. A first-N subset of a class-per-folder dataset holds only the first classes.
    """
    labels = np.asarray(labels)
    size = min(int(size), len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    round_of = np.empty(len(labels), dtype=np.int64)  # which round of the round-robin takes each image
    position = np.empty(len(labels), dtype=np.int64)  # the class's place within a round
    for place, label in enumerate(classes):
        queue = rng.permutation(np.flatnonzero(labels == label))
        round_of[queue[::-1]] = np.arange(len(queue))  # the queue is taken from its end
        position[queue] = place
    order = np.lexsort((position, round_of))
    return np.sort(order[:size])


@dataclass
class Dataset:
    """Labelled (or unlabelled) images, either in memory (uint8 NHWC) or as files on disk.

    A dataset drawn from a larger one (`subset`, `take`) records how in `sampling` (for the CLI to
    say so) and, in memory, each image's position in the source (`positions`), so `ids()` still
    names the source's images.
    """

    name: str
    class_names: tuple[str, ...]
    labels: np.ndarray | None
    images: np.ndarray | None = None  # uint8 (N, H, W, 3) for in-memory datasets
    paths: list[Path] = field(default_factory=list)  # for file datasets
    sampling: str | None = None  # e.g. "2000 of 10000 images, class-balanced (seed 0)"; None: all of them
    positions: np.ndarray | None = None  # in-memory images: their indices in the source dataset

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def ids(self) -> list[str]:
        """One name per image: its path, or `<name>[<index in the source>]` for in-memory images."""
        if self.images is not None:
            where = range(len(self)) if self.positions is None else self.positions.tolist()
            return [f"{self.name}[{i}]" for i in where]
        return [str(p) for p in self.paths]

    def take(self, indices: np.ndarray | Sequence[int], sampling: str | None = None) -> Dataset:
        """The images at `indices`, in that order (labels, paths and source positions follow)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        positions = None
        if self.images is not None:
            positions = indices if self.positions is None else self.positions[indices]
        return replace(
            self, labels=None if self.labels is None else self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=[self.paths[i] for i in indices] if self.paths else [],
            sampling=sampling if sampling is not None else self.sampling, positions=positions,
        )

    def subset_indices(self, limit: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
        """The positions `subset(limit)` keeps: class-balanced and seeded with labels, else the first."""
        if limit is not None and limit < 1:
            raise UsageError(f"--limit must be positive, got {limit}")
        if limit is None or limit >= len(self):
            return np.arange(len(self))
        if self.labels is None:
            return np.arange(limit)
        return balanced_indices(self.labels, limit, seed)

    def subset(self, limit: int | None, seed: int = SUBSET_SEED) -> Dataset:
        """At most `limit` images: a seeded, class-balanced draw kept in the dataset's order (the first
        `limit` when there are no labels). What was drawn is recorded in `sampling`."""
        indices = self.subset_indices(limit, seed)
        if len(indices) == len(self):
            return self
        how = (f"class-balanced (seed {seed})" if self.labels is not None
               else "the first ones (no labels to balance by)")
        sampling = f"{len(indices)} of {len(self)} images, {how}"
        return self.take(indices, sampling if self.sampling is None else f"{sampling}; of {self.sampling}")

    def uint8_batches(self, card: ModelCard, batch_size: int, workers: int | None = None,
                      device: str = "cpu") -> Iterator[Any]:
        """uint8 NHWC batches at the card's input size, in order.

        Files decode on `workers` threads (default: every core; toolkit/decode_pool.py), a window
        ahead across batch boundaries. With a CUDA `device`, JPEGs decode on the GPU (nvjpeg) and the
        batches are uint8 tensors on that device (toolkit/gpu_decode.py); other formats use the pool.
        """
        if batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {batch_size}")
        if self.images is not None:
            for start in range(0, len(self), batch_size):
                yield self.images[start:start + batch_size]
            return
        if device.startswith("cuda"):
            from .gpu_decode import tensor_uint8_batches

            yield from tensor_uint8_batches(self.paths, card, batch_size, device=device, workers=workers)
            return
        with DecodePool(workers) as pool:
            yield from pool.batches(functools.partial(load_uint8, card=card), self.paths, batch_size)

    def batches(self, card: ModelCard, batch_size: int, workers: int | None = None) -> Iterator[np.ndarray]:
        """float32 NCHW batches, normalised as `card` prescribes."""
        for raw in self.uint8_batches(card, batch_size, workers):
            yield preprocess(raw, card)

    def aligned_to(self, class_names: Sequence[str]) -> Dataset:
        """Relabel so label i means `class_names[i]` (the model's order). A mismatch lists both."""
        if tuple(class_names) == self.class_names or self.labels is None:
            return self
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [n for n in self.class_names if n not in index]
        if unknown:
            raise DataError(
                f"dataset classes {list(self.class_names)} do not match the model's classes "
                f"{list(class_names)} (unknown to the model: {unknown})"
            )
        mapping = np.array([index[n] for n in self.class_names], dtype=np.int64)
        return replace(self, class_names=tuple(class_names), labels=mapping[self.labels])


# --- CIFAR ------------------------------------------------------------------------------------

def _cifar_folder(root: Path, name: str) -> Path:
    spec = CIFAR[name]
    for candidate in (root / spec["folder"], root):
        if (candidate / spec["meta"]).exists():  # a FIFO or folder here is refused when read, not skipped
            return candidate
    raise DataError(
        f"{name} not found under {root}: expected {root / spec['folder']}/ with "
        f"{spec['meta']} and {', '.join(spec['test'])} (the official python version); "
        f"pass --data-dir, or --download to fetch it"
    )


def load_cifar(root: str | Path, name: str = "cifar10", split: str = "test",
               download: bool = False) -> Dataset:
    """CIFAR-10/100 in the official python format (`cifar-10-batches-py`, `cifar-100-python`)."""
    if name not in CIFAR:
        raise UsageError(f"unknown CIFAR dataset {name!r}")
    if split not in ("train", "test"):
        raise UsageError(f"--split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if download and not (root / CIFAR[name]["folder"]).is_dir():
        download_cifar(root, name)
    folder = _cifar_folder(root, name)
    spec = CIFAR[name]
    meta_path = folder / spec["meta"]
    names = _class_names(safe_unpickle(meta_path), spec["names_key"], meta_path)
    patterns = spec["train"] if split == "train" else spec["test"]
    files = [p for pattern in patterns for p in sorted(folder.glob(pattern))]
    if not files:
        raise DataError(f"{folder}: no {split} batches ({', '.join(patterns)})")
    images, labels = [], []
    for path in files:
        batch_images, batch_labels = read_cifar_batch(path, spec["label_key"])
        images.append(batch_images)
        labels.append(batch_labels)
    label_array = np.concatenate(labels)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(names)):
        raise DataError(f"{folder}: labels outside 0..{len(names) - 1} "
                        f"(found {label_array.min()}..{label_array.max()})")
    return Dataset(name=f"{name}-{split}", class_names=names, labels=label_array,
                   images=np.ascontiguousarray(np.concatenate(images)))


def download_cifar(root: Path, name: str) -> Path:
    """Fetch the official archive and check its published md5 (never used by tests)."""
    spec = CIFAR[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise DataError(f"cannot download {spec['url']}: {exc}") from None
    if hashlib.md5(payload).hexdigest() != spec["md5"]:
        raise DataError(f"{spec['url']}: md5 mismatch; the download is corrupt, try again")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:
        archive.extractall(root, filter="data")
    return root / spec["folder"]


# --- image folders and lists -----------------------------------------------------------------

def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def load_image_folder(root: str | Path) -> Dataset:
    """class-per-subfolder layout (torchvision's ImageFolder); class names from folder names."""
    root = require_dir(root, what="image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for index, class_name in enumerate(classes):
        files = sorted(p for p in (root / class_name).rglob("*") if is_image_file(p))
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise DataError(f"{root}: no images in class subfolders (expected {root}/<class>/<image>.jpg)")
    return Dataset(name=root.name, class_names=tuple(classes), labels=np.asarray(labels, dtype=np.int64),
                   paths=paths)


def expand_inputs(specs: Iterable[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> image paths, in a stable order. Missing ones are named."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_image_file(p))
        elif path.exists():
            found.append(path)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in globmod.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"no files match {spec!r}")
            found += matches
        else:
            raise DataError(f"no such file or folder: {spec}")
    return found


# --- the sample --------------------------------------------------------------------------------

def load_sample(split: str = "test") -> Dataset:
    """Real handwritten digits (scikit-learn's) in CIFAR-10 format, shipped with the package."""
    dataset = load_cifar(SAMPLE_DIR, "cifar10", split)
    dataset.name = f"sample-{split}"
    return dataset


def write_sample_folder(root: Path, count: int, size: int = 40, seed: int = 0) -> Path:
    """`count` PNGs of `size`x`size` in class-per-folder layout under `root`, made from the sample's real
    digits (small random noise keeps every file distinct): a folder dataset for tests and benches,
    generated, never downloaded."""
    from PIL import Image

    sample = load_sample("test")
    assert sample.images is not None and sample.labels is not None
    rng = np.random.default_rng(seed)
    for i in range(count):
        j = i % len(sample)
        pixels = sample.images[j].astype(np.int16) + rng.integers(-6, 7, sample.images[j].shape)
        folder = root / sample.class_names[sample.labels[j]]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((size, size))
        image.save(folder / f"{i:05d}.png")
    return root


def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "test",
                 download: bool = False) -> Dataset:
    """The one entry point behind `--dataset`/`--data-dir`."""
    if name == "sample":
        return load_sample(split)
    if name in CIFAR:
        return load_cifar(data_dir or Path("data"), name, split, download)
    if name == "folder":
        if data_dir is None:
            raise UsageError("--dataset folder needs --data-dir pointing at class-per-subfolder images")
        return load_image_folder(data_dir)
    raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
