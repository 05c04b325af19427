"""The server's errors and how every error goes on the wire: `{"error": message}` with its status.

Each class is a `ToolkitError` whose `http_status` is the answer; the app's exception handler and
the guard middlewares both answer through `error_response`, so a client sees one shape for every
mistake, from a wrong API key to an image it cannot decode.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from toolkit.errors import InputError, ToolkitError

from .config import ServeConfig

log = logging.getLogger("toolkit.serve")


class ServiceUnavailableError(ToolkitError):
    """Not ready yet (warming up) or shutting down (503 with Retry-After)."""

    http_status = 503


class NotFoundError(ToolkitError):
    """An unknown model name or version (404)."""

    http_status = 404


class UnauthorizedError(ToolkitError):
    """Missing or wrong API key (401)."""

    http_status = 401


class RequestTimeoutError(InputError):
    """The client was too slow sending its request (408; the connection is closed)."""

    http_status = 408


class PayloadTooLargeError(InputError):
    """A body, archive or image beyond the server's limits (413)."""

    http_status = 413


class UnsupportedMediaError(InputError):
    """A Content-Type, Content-Encoding or archive compression the server does not read (415)."""

    http_status = 415


class QueueFullError(ToolkitError):
    """The server has more waiting requests than `--max-queue` (503 with Retry-After)."""

    http_status = 503


class QueueTimeoutError(ToolkitError):
    """The request waited longer than `--timeout-s` (504)."""

    http_status = 504


class ServeStartupError(ToolkitError):
    """The model cannot be served (its warm-up failed): `toolkit serve` exits 1 with the reason."""


class ModelLoadError(ToolkitError):
    """A model that cannot be loaded: its folder, config or file is wrong, or it fails to open or warm up
    (400 with the reason, as Triton answers a failed load; the model is UNAVAILABLE in the index)."""


class UnknownModelError(ModelLoadError):
    """A load for a name the repository does not hold (400, Triton's "failed to poll" message)."""


class RepositoryControlError(ToolkitError):
    """Load/unload asked of a server whose model set is fixed at start (model control mode "none";
    Triton: UNAVAILABLE, 503)."""

    http_status = 503


def error_response(status: int, message: str, retry_after: int | None = None, *, close: bool = False,
                   **extra: Any) -> JSONResponse:
    """`{"error": message}`; Retry-After on 429/503; `Connection: close` when the body was not read."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None and status in (429, 503) else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers or None)


def error_answer(exc: ToolkitError, config: ServeConfig) -> JSONResponse:
    """The answer to a ToolkitError raised while handling a request: its status and message."""
    return error_response(exc.http_status, str(exc), retry_after=config.retry_after_s)


def internal_error_answer(exc: Exception) -> JSONResponse:
    """A 500 for the server's own failure (a backend error): logged with its traceback, answered with its
    type only. The body was read, so the keep-alive connection stays usable."""
    log.error("internal error", exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__}); see the server log")
