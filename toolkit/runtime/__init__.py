"""Runtimes: one Runner protocol, one module per backend, and `open_model` to pick among them."""

from .base import Runner
from .registry import BACKENDS, detect_format, open_model

__all__ = ["BACKENDS", "Runner", "detect_format", "open_model"]
