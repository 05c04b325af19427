"""Datasets: CIFAR-10/100 (official python format), image folders, image lists, and the sample.

Every dataset yields preprocessed float32 NCHW batches through the one `preprocess` function.
CIFAR batches are pickles, so they are read with a restricted unpickler that only rebuilds numpy
arrays and plain containers: a planted payload in a downloaded batch cannot run.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import io
import pickle
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .card import ModelCard
from .errors import DataError, UsageError
from .images import IMAGE_SUFFIXES, decode_image
from .preprocess import preprocess, to_uint8

DATASETS = ("cifar10", "cifar100", "folder", "sample")
SAMPLE_DIR = Path(__file__).parent / "sample" / "digits-batches-py"

CIFAR = {
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


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and builtins only; anything else is refused before it runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        # protocol >= 5 pickles of arrays (str-keyed batches re-saved with Python 3) rebuild via this
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch; bytes keys (Python 2 pickles) become str keys."""
    try:
        with path.open("rb") as handle:
            obj = _SafeUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a valid CIFAR batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a valid CIFAR batch (found {type(obj).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


@dataclass
class Dataset:
    """Labelled (or unlabelled) images, either in memory (uint8 NHWC) or as files on disk."""

    name: str
    class_names: tuple[str, ...]
    labels: np.ndarray | None
    images: np.ndarray | None = None  # uint8 (N, H, W, 3) for in-memory datasets
    paths: list[Path] = field(default_factory=list)  # for file datasets

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def ids(self) -> list[str]:
        if self.images is not None:
            return [f"{self.name}[{i}]" for i in range(len(self))]
        return [str(p) for p in self.paths]

    def subset(self, limit: int | None) -> Dataset:
        """The first `limit` items (stratified order is the data's own, as torchvision's)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise UsageError(f"--limit must be positive, got {limit}")
        return Dataset(
            name=self.name, class_names=self.class_names,
            labels=None if self.labels is None else self.labels[:limit],
            images=None if self.images is None else self.images[:limit],
            paths=self.paths[:limit],
        )

    def uint8_batches(self, card: ModelCard, batch_size: int, workers: int = 2) -> Iterator[np.ndarray]:
        """uint8 NHWC batches at the card's input size. Files decode in a thread pool, in order."""
        if batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {batch_size}")
        if self.images is not None:
            for start in range(0, len(self), batch_size):
                yield self.images[start:start + batch_size]
            return
        draft = (card.resize_size, card.resize_size)

        def load(path: Path) -> np.ndarray:
            return to_uint8(decode_image(path, draft_size=draft), card)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(self.paths), batch_size):
                yield np.stack(list(pool.map(load, self.paths[start:start + batch_size])))

    def batches(self, card: ModelCard, batch_size: int) -> Iterator[np.ndarray]:
        """float32 NCHW batches, normalised as `card` prescribes."""
        for raw in self.uint8_batches(card, batch_size):
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
        return Dataset(self.name, tuple(class_names), mapping[self.labels], self.images, self.paths)


# --- CIFAR ------------------------------------------------------------------------------------

def _cifar_folder(root: Path, name: str) -> Path:
    spec = CIFAR[name]
    for candidate in (root / spec["folder"], root):
        if (candidate / spec["meta"]).is_file():
            return candidate
    raise DataError(
        f"{name} not found under {root}: expected {root / spec['folder']}/ with "
        f"{spec['meta']} and {', '.join(spec['test'])} (the official python version); "
        f"pass --data-dir, or --download to fetch it"
    )


def load_cifar(root: str | Path, name: str = "cifar10", split: str = "test", download: bool = False) -> Dataset:
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
    meta = safe_unpickle(folder / spec["meta"])
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]])
    files = [p for pattern in spec[split] for p in sorted(folder.glob(pattern))]
    if not files:
        raise DataError(f"{folder}: no {split} batches ({', '.join(spec[split])})")
    images, labels = [], []
    for path in files:
        batch = safe_unpickle(path)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: expected rows of 3072 bytes, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[spec["label_key"]], dtype=np.int64))
    label_array = np.concatenate(labels)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(names)):
        raise DataError(f"{folder}: labels outside 0..{len(names) - 1}")
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
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
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
