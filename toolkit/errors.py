"""Typed errors that carry a message a person can act on.

The CLI turns any `ToolkitError` into one red line and `exit_code`; the server turns it into
`http_status` with `{"error": message}`. Anything else is a bug and may show a traceback.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class: the work found a problem with the user's input (exit 1, HTTP 400)."""

    exit_code: int = 1
    http_status: int = 400


class UsageError(ToolkitError):
    """The command line itself is wrong: conflicting or missing options (exit 2)."""

    exit_code = 2


class CheckpointError(ToolkitError):
    """A checkpoint cannot be read, is truncated, or carries code we refuse to run."""


class ArchitectureError(ToolkitError):
    """The tensors are not a supported ResNet/ResNeXt, or disagree with `--arch`."""


class DataError(ToolkitError):
    """A dataset or image cannot be found or read."""


class InputError(ToolkitError):
    """A batch or request does not match what the model expects (shape, dtype, size)."""


class ModelFormatError(ToolkitError):
    """A model artifact is of an unknown type, corrupt, or lacks its card."""


class ExportError(ToolkitError):
    """An export could not be written."""


class VerificationError(ToolkitError):
    """An exported artifact disagrees with eager PyTorch beyond tolerance."""


class BackendUnavailableError(ToolkitError):
    """A runtime library or device is missing; the message says what to install or which device."""

    http_status = 503


class NoSpaceError(ToolkitError):
    """The filesystem is full (or over quota): "no space left on <path>"; nothing partial is left behind."""

    http_status = 507


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A foreign exception's first line, for one-line messages (protobuf, ORT and TensorRT write walls)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
