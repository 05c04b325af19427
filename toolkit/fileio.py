"""Atomic writes: an interrupted export or report never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError


@contextlib.contextmanager
def atomic_path(destination: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it into place on success.

    The temporary file keeps the destination's suffix so writers that infer the format from it
    (onnx, torch.jit.save) behave. On any exception the temporary is removed and the destination
    is untouched.
    """
    destination = Path(destination)
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=suffix or "".join(destination.suffixes[-1:]) or ".tmp",
            dir=folder,
        )
    except OSError as exc:
        raise ExportError(f"cannot write to {folder}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(destination: str | Path, data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


def atomic_write_text(destination: str | Path, text: str) -> Path:
    return atomic_write_bytes(destination, text.encode("utf-8"))
