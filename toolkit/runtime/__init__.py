"""Runtimes: one Runner protocol, one module per backend, and `open_model` to pick among them.

Only the registry is imported here (no numpy), so the CLI can build its `--backend` choices from it
at start-up; `Runner` is imported on first use.
"""

from typing import Any

from .registry import BACKENDS, FORMATS, detect_format, open_model

__all__ = ["BACKENDS", "FORMATS", "Runner", "detect_format", "open_model"]


def __getattr__(name: str) -> Any:
    if name == "Runner":
        from .base import Runner

        return Runner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
