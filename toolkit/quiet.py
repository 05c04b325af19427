"""Quieting another library's logger for one call, leaving the process's logging as it was afterwards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quieted(logger: str | None, level: int = logging.ERROR) -> Iterator[None]:
    """Only records at `level` and above from `logger` (None: the root logger) while the block runs."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)
