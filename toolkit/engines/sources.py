"""Inputs beyond the local disk for the ray engine: fsspec URLs (s3://, gs://, memory://, file://...).

Local paths go through toolkit.data and toolkit.evaluate unchanged; a URL folder becomes the same
`Dataset` (class-per-subfolder) whose paths are URL strings, and a URL input the same
`PredictInput` with the URL as its name and no local path. Bytes are read where the decoding runs
(a Ray task), except from filesystems that live only in this process (memory://), which are read
here and shipped with the rows. fsspec is imported only when a URL is seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..data import load_dataset as load_local_dataset
from ..errors import DataError, UsageError
from ..evaluate import PredictInput, gather_inputs
from ..images import IMAGE_SUFFIXES

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/+)(.*)$", re.DOTALL)
PROCESS_LOCAL = ("memory",)  # filesystems other processes cannot see


def as_url(value: str | Path | None) -> str | None:
    """The URL in `value`, or None for a local path. Undoes Path's folding of `s3://b/k` into `s3:/b/k`."""
    if value is None:
        return None
    match = _URL.match(str(value))
    if not match or len(match.group(1)) < 2:  # no scheme, or a Windows drive letter
        return None
    scheme, slashes, rest = match.groups()
    if len(slashes) == 1:
        rest = ("/" if scheme == "file" else "") + rest
    elif len(slashes) > 2:
        rest = "/" * (len(slashes) - 2) + rest
    return f"{scheme}://{rest}"


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: URLs need fsspec: pip install 'resnet-toolkit[ray]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown scheme, or its driver (s3fs, gcsfs) missing
        raise UsageError(f"{url}: cannot open this URL ({exc})") from None


def is_process_local(url: str) -> bool:
    return url.split("://", 1)[0] in PROCESS_LOCAL


def read_url(url: str) -> bytes:
    """The bytes behind `url` (raises OSError and friends as fsspec does)."""
    fs, path = _filesystem(url)
    with fs.open(path, "rb") as handle:
        return handle.read()


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def _url_of(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def load_url_folder(url: str) -> Dataset:
    """A class-per-subfolder image folder at an fsspec URL, like toolkit.data.load_image_folder."""
    fs, root = _filesystem(url)
    try:
        if not fs.isdir(root):
            raise DataError(f"image folder not found: {url}")
        classes = sorted(Path(d).name for d in fs.ls(root, detail=False)
                         if fs.isdir(d) and not Path(d).name.startswith("."))
        paths: list[Any] = []
        labels: list[int] = []
        for index, name in enumerate(classes):
            files = sorted(f for f in fs.find(f"{root.rstrip('/')}/{name}") if _is_image(f))
            paths += [_url_of(fs, f) for f in files]
            labels += [index] * len(files)
    except OSError as exc:
        raise DataError(f"{url}: cannot list ({exc})") from None
    if not paths:
        raise DataError(f"{url}: no images in class subfolders (expected {url}/<class>/<image>.jpg)")
    return Dataset(name=Path(root.rstrip("/")).name or url, class_names=tuple(classes),
                   labels=np.asarray(labels, dtype=np.int64), paths=paths)


def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "test",
                 download: bool = False) -> Dataset:
    """toolkit.data.load_dataset, plus `--dataset folder --data-dir URL`."""
    url = as_url(data_dir)
    if url is None:
        return load_local_dataset(name, data_dir, split, download)
    if name != "folder":
        raise UsageError(f"--data-dir {url}: URLs are read for --dataset folder; copy {name} to a local "
                         "folder")
    return load_url_folder(url)


def _url_inputs(url: str) -> list[PredictInput]:
    fs, path = _filesystem(url)
    try:
        if any(ch in path for ch in "*?["):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not found:
                return [PredictInput(url, None, f"no files match {url!r}")]
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _is_image(p))
        elif fs.isfile(path):
            found = [path]
        else:
            return [PredictInput(url, None, f"no such file or folder: {url}")]
    except OSError as exc:
        return [PredictInput(url, None, f"{url}: cannot list ({exc})")]
    return [PredictInput(_url_of(fs, p)) for p in found]


def gather(specs: Sequence[str], stdin_lines: Iterable[str] | None = None) -> list[PredictInput]:
    """toolkit.evaluate.gather_inputs, plus URLs (files, folders, globs) in any fsspec filesystem."""
    items: list[PredictInput] = []
    for spec in specs:
        if spec == "-":
            lines = [line.strip() for line in (stdin_lines or [])]
            items += gather([line for line in lines if line and line != "-"])
        elif as_url(spec) is not None and "://" in spec:
            items += _url_inputs(spec)
        else:
            items += gather_inputs([spec])
    return items


def location(item: PredictInput) -> str:
    """Where a gathered input is read from: its local path, or its URL."""
    return str(item.path) if item.path is not None else item.name
