"""Uploaded bytes -> model-ready arrays, and labelled uploads -> a `Dataset` for /evaluate.

Runs in the server's decode thread pool, never on the event loop. Every image goes through the
toolkit's one decoder (`decode_image`) and one preprocessing (`to_uint8` + `preprocess`), with the
same JPEG draft policy as offline predict, so server answers equal offline answers.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from toolkit.card import ModelCard
from toolkit.data import Dataset
from toolkit.errors import DataError, InputError
from toolkit.images import IMAGE_SUFFIXES, UnsupportedImageError, decode_image
from toolkit.preprocess import preprocess, to_uint8


class PayloadTooLargeError(InputError):
    """A body, archive or image beyond the server's limits (413)."""

    http_status = 413


def load_uint8(data: bytes, card: ModelCard, *, max_pixels: int, name: str) -> np.ndarray:
    """One uploaded image -> uint8 HxWx3 at the card's input size."""
    if not data:
        raise UnsupportedImageError(f"{name}: empty upload")
    image = decode_image(data, draft_size=(card.resize_size, card.resize_size), name=name, max_pixels=max_pixels)
    try:
        return to_uint8(image, card)
    except (OSError, ValueError) as exc:
        raise UnsupportedImageError(f"{name}: cannot convert image ({exc})") from None


def load_batch(data: bytes, card: ModelCard, *, max_pixels: int, name: str) -> np.ndarray:
    """One uploaded image -> normalised float32 (1, 3, H, W): decode and preprocess in one pool hop."""
    return preprocess(load_uint8(data, card, max_pixels=max_pixels, name=name), card)


# --- /evaluate ---------------------------------------------------------------------------------

def parse_labels(values: Sequence[str], count: int, class_names: Sequence[str]) -> np.ndarray:
    """Labels as sent: one form field per file, or one JSON list / comma- or newline-separated string.

    Each label is a class name of the model or an integer index.
    """
    items: list[object] = []
    for value in values:
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"labels: invalid JSON list ({exc})") from None
            if not isinstance(parsed, list):
                raise InputError("labels: expected a JSON list")
            items += parsed
        elif len(values) == 1 and count > 1:
            items += [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
        else:
            items.append(text)
    if len(items) != count:
        raise InputError(f"got {count} images but {len(items)} labels; send one label per image "
                         "(repeat the 'labels' field, or one JSON list)")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.empty(count, dtype=np.int64)
    for i, item in enumerate(items):
        key = str(item)
        if key in index:
            labels[i] = index[key]
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(class_names):
            labels[i] = int(key)
        else:
            raise InputError(f"label {key!r} is neither a class of the model nor an index 0..{len(class_names) - 1}")
    return labels


def read_zip(data: bytes, *, max_bytes: int, max_files: int = 100_000) -> tuple[list[str], list[tuple[str, bytes]]]:
    """class-per-folder images inside a zip -> (class folder per image, [(name, bytes)]).

    Read in memory (nothing touches the disk, so no path traversal); the uncompressed total is
    capped at `max_bytes` against zip bombs. The class is the image's parent folder.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError("the upload is not a valid zip archive") from None
    classes, files, total = [], [], 0
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise PayloadTooLargeError(f"zip holds {len(members)} files; the limit is {max_files}")
        for member in members:
            path = PurePosixPath(member.filename)
            if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith((".", "__MACOSX")) for p in path.parts):
                continue
            if len(path.parts) < 2:
                raise InputError(f"zip entry {member.filename}: images must sit in class folders "
                                 "(<class>/<image>.png)")
            total += member.file_size
            if total > max_bytes:
                raise PayloadTooLargeError(f"zip expands beyond {max_bytes // (1024 * 1024)} MB (--max-body-mb)")
            try:
                payload = archive.read(member)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                raise InputError(f"zip entry {member.filename}: cannot read ({exc})") from None
            classes.append(path.parts[-2])
            files.append((member.filename, payload))
    if not files:
        raise DataError("the zip holds no images in class folders (<class>/<image>.png)")
    return classes, files


def labelled_dataset(images: list[np.ndarray], labels: np.ndarray, class_names: Sequence[str]) -> Dataset:
    return Dataset(name="upload", class_names=tuple(class_names), labels=labels,
                   images=np.ascontiguousarray(np.stack(images)))


def folder_dataset(images: list[np.ndarray], folders: list[str], class_names: Sequence[str]) -> Dataset:
    """Images labelled by class folder; aligned to the model's classes by name (as `eval --dataset folder`)."""
    folder_classes = tuple(sorted(set(folders)))
    index = {name: i for i, name in enumerate(folder_classes)}
    labels = np.array([index[f] for f in folders], dtype=np.int64)
    return Dataset(name="upload", class_names=folder_classes, labels=labels,
                   images=np.ascontiguousarray(np.stack(images)))
