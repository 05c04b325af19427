"""Uploaded bytes -> model-ready arrays, and labelled uploads -> a `Dataset` for /evaluate.

Runs in the server's decode thread pool, never on the event loop. Every image goes through the
toolkit's one decoder (`decode_image`) and one preprocessing (`to_uint8` + `preprocess`), with the
same JPEG draft policy as offline predict, so server answers equal offline answers.
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from toolkit.card import ModelCard
from toolkit.data import Dataset
from toolkit.errors import DataError, InputError, ToolkitError
from toolkit.images import IMAGE_SUFFIXES, UnsupportedImageError, decode_image
from toolkit.preprocess import preprocess, to_uint8

from .errors import PayloadTooLargeError, UnsupportedMediaError

__all__ = ["PayloadTooLargeError", "folder_dataset", "labelled_dataset", "load_batch", "load_uint8",
           "parse_labels", "read_zip"]
log = logging.getLogger("toolkit.serve")


def load_uint8(data: bytes, card: ModelCard, *, max_pixels: int, name: str) -> np.ndarray:
    """One uploaded image -> uint8 HxWx3 at the card's input size.

    The bytes are the client's: whatever a decoder raises on them (Pillow's plugins fail in their
    own ways) is an unreadable image (400), never a server error.
    """
    if not data:
        raise UnsupportedImageError(f"{name}: empty upload")
    try:
        image = decode_image(data, draft_size=(card.resize_size, card.resize_size), name=name,
                             max_pixels=max_pixels)
        return to_uint8(image, card)
    except ToolkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure on client bytes is the client's problem
        log.info("%s: unreadable image (%s: %s)", name, type(exc).__name__, exc)
        raise InputError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from None


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
            except (json.JSONDecodeError, RecursionError) as exc:
                raise InputError(f"labels: invalid JSON list ({type(exc).__name__})") from None
            if not isinstance(parsed, list):
                raise InputError("labels: expected a JSON list")
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in parsed):
                raise InputError("labels: a JSON list of class names or integer indices is expected")
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
        elif key.isdigit() and len(key) < 12 and int(key) < len(class_names):
            labels[i] = int(key)
        else:
            raise InputError(f"label {key[:80]!r} is neither a class of the model nor an index "
                             f"0..{len(class_names) - 1}")
    return labels


def read_zip(data: bytes, *, max_bytes: int, max_member_bytes: int | None = None,
             max_files: int = 100_000) -> tuple[list[str], list[tuple[str, bytes]]]:
    """class-per-folder images inside a zip -> (class folder per image, [(name, bytes)]).

    Read in memory (nothing touches the disk, so no path traversal). Against zip bombs every member
    is inflated by us, in steps, counting the bytes it actually produces: one member may give at most
    `max_member_bytes`, all together `max_bytes`; what the archive *declares* is never trusted.
    The class is the image's parent folder.
    """
    member_cap = max_bytes if max_member_bytes is None else min(max_member_bytes, max_bytes)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"the upload is not a valid zip archive ({exc})") from None
    classes, files, total = [], [], 0
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise PayloadTooLargeError(f"zip holds {len(members)} files; the limit is {max_files}")
        for member in members:
            path = PurePosixPath(member.filename)
            hidden = any(p.startswith((".", "__MACOSX")) for p in path.parts)
            if path.suffix.lower() not in IMAGE_SUFFIXES or hidden:
                continue
            if len(path.parts) < 2:
                raise InputError(f"zip entry {member.filename}: images must sit in class folders "
                                 "(<class>/<image>.png)")
            payload = _inflate(data, member, min(member_cap, max_bytes - total), total_cap=max_bytes)
            total += len(payload)
            classes.append(path.parts[-2])
            files.append((member.filename, payload))
    if not files:
        raise DataError("the zip holds no images in class folders (<class>/<image>.png)")
    return classes, files


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
_STEP = 1 << 20  # compressed bytes fed to the decompressor at a time


def _inflate(data: bytes, member: zipfile.ZipInfo, cap: int, *, total_cap: int) -> bytes:
    """The member's bytes, inflated by us with a hard cap on the bytes produced, CRC checked."""
    name = member.filename
    if member.flag_bits & 0x1:
        raise UnsupportedMediaError(f"zip entry {name}: encrypted entries are not supported")
    offset = member.header_offset
    header = data[offset:offset + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
        raise InputError(f"zip entry {name}: damaged archive (no local header)")
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = offset + _LOCAL_HEADER.size + name_length + extra_length
    raw = memoryview(data)[start:start + member.compress_size]
    if len(raw) < member.compress_size:
        raise InputError(f"zip entry {name}: truncated archive")
    decompress: zlib._Decompress | bz2.BZ2Decompressor | None
    if member.compress_type == zipfile.ZIP_STORED:
        decompress = None
    elif member.compress_type == zipfile.ZIP_DEFLATED:
        decompress = zlib.decompressobj(-zlib.MAX_WBITS)
    elif member.compress_type == zipfile.ZIP_BZIP2:
        decompress = bz2.BZ2Decompressor()
    else:
        raise UnsupportedMediaError(f"zip entry {name}: compression method {member.compress_type} is not "
                                    "supported (use store, deflate or bzip2)")
    too_big = PayloadTooLargeError(f"zip entry {name} expands beyond {cap} bytes, or the zip beyond "
                                   f"{total_cap // (1024 * 1024)} MB (--max-body-mb)")
    if decompress is None:
        if len(raw) > cap:
            raise too_big
        out = bytes(raw)
    else:
        chunks: list[bytes] = []
        size = 0
        try:
            for begin in range(0, max(len(raw), 1), _STEP):
                piece: bytes = raw[begin:begin + _STEP].tobytes()
                while True:  # drain what this piece yields, never more than cap + 1 bytes per call
                    chunk = decompress.decompress(piece, cap + 1 - size)
                    size += len(chunk)
                    if size > cap:
                        raise too_big
                    chunks.append(chunk)
                    pending = _pending_input(decompress)
                    if pending is None:
                        break
                    piece = pending
        except (zlib.error, OSError, EOFError, ValueError) as exc:
            raise InputError(f"zip entry {name}: cannot inflate ({exc})") from None
        out = b"".join(chunks)
    if zlib.crc32(out) != member.CRC or len(out) != member.file_size:
        raise InputError(f"zip entry {name}: damaged (size or CRC does not match)")
    return out


def _pending_input(decompress: zlib._Decompress | bz2.BZ2Decompressor) -> bytes | None:
    """What to feed next to get the output held back by the length cap; None when the piece is done."""
    if isinstance(decompress, bz2.BZ2Decompressor):
        return None if decompress.needs_input or decompress.eof else b""
    return decompress.unconsumed_tail or None


def labelled_dataset(images: list[np.ndarray], labels: np.ndarray, class_names: Sequence[str]) -> Dataset:
    return Dataset(name="upload", class_names=tuple(class_names), labels=labels,
                   images=np.ascontiguousarray(np.stack(images)))


def folder_dataset(images: list[np.ndarray], folders: list[str], class_names: Sequence[str]) -> Dataset:
    """Images labelled by folder, aligned to the model's classes by name (like `eval --dataset folder`)."""
    folder_classes = tuple(sorted(set(folders)))
    index = {name: i for i, name in enumerate(folder_classes)}
    labels = np.array([index[f] for f in folders], dtype=np.int64)
    return Dataset(name="upload", class_names=folder_classes, labels=labels,
                   images=np.ascontiguousarray(np.stack(images)))
