"""Refuse devices, pipes and sockets before reading: one check for every file the toolkit opens.

A `.pt` symlinked to `/dev/zero` is read forever, a FIFO named `test_batch` or `x.png` blocks the
process until killed. `os.stat` follows symlinks and never blocks, so checking the file type first
costs one system call and turns each of those into a one-line error. Light on purpose (stdlib only):
the checkpoint, data, image, card and model-opening code all import it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DataError, ToolkitError

_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat(path: Path, error: type[ToolkitError], what: str) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def require_file(path: str | Path, *, error: type[ToolkitError] = DataError, what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed); else `error` naming what it is instead."""
    path = Path(path)
    mode = _stat(path, error, what).st_mode
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {_kind(mode)}, not a regular file: refusing to read it")
    return path


def require_dir(path: str | Path, *, error: type[ToolkitError] = DataError, what: str = "folder") -> Path:
    """`path` if it is a directory (symlinks followed); else `error`."""
    path = Path(path)
    mode = _stat(path, error, what).st_mode
    if not stat.S_ISDIR(mode):
        raise error(f"{what} {path} is {_kind(mode)}, not a directory")
    return path


def require_file_or_dir(path: str | Path, *, error: type[ToolkitError] = DataError,
                        what: str = "file") -> Path:
    """`path` if it is a regular file or a directory (a model file or a Triton model folder)."""
    path = Path(path)
    mode = _stat(path, error, what).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"{what} {path} is {_kind(mode)}, not a regular file or folder: refusing to read it")
    return path


def read_bytes_bounded(path: str | Path, max_bytes: int, *, error: type[ToolkitError] = DataError,
                       what: str = "file") -> bytes:
    """The whole of a regular file of at most `max_bytes` (checked before, and while, reading)."""
    path = require_file(path, error=error, what=what)
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size > max_bytes:
                raise error(f"{what} {path} is larger than the limit of {max_bytes} bytes")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew since the check
        raise error(f"{what} {path} is larger than the limit of {max_bytes} bytes")
    return data
