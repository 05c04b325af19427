"""The request guard as small ASGI middlewares, each with one job, applied before any route runs.

    Accounting( ApiKeyGuard( DrainGuard( BodyLimitGuard( app ))))

`Accounting` counts responses and in-flight work and is the last safety net: an exception that
escaped the app never reaches uvicorn (which would drop the keep-alive connection without
`Connection: close`). `ApiKeyGuard` lets only the documented health endpoints and the page through
without the key. `DrainGuard` refuses new work once SIGTERM arrived. `BodyLimitGuard` reads the
whole body before the route sees it, refusing one over the limit (413) or too slow to arrive (408).
Plain ASGI: a few microseconds per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .config import ServeConfig
from .errors import error_response
from .state import ServerState

log = logging.getLogger("toolkit.serve")

# As starlette.types spells them, so an app's callables and Starlette's responses fit these.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/", "/favicon.ico"})  # exact paths only
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != "0")


class Accounting:
    """Responses by status, requests in flight (what draining waits for), and the last safety net."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counters = self.state.counters
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                counters.record_http(message["status"])
            await send(message)

        is_work = scope["method"] == "POST"
        if is_work:
            counters.in_flight += 1
        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            if not started:  # connection silently. Answered and logged once, the connection stays usable.
                log.exception("internal error")
                await error_response(500, "internal server error; see the server log", close=True)(
                    scope, receive, counted_send)
        finally:
            if is_work:
                counters.in_flight -= 1
        return None


class ApiKeyGuard:
    """401 unless `Authorization: Bearer <key>` or `X-API-Key: <key>` (`ServerState.authorised`, the
    check gRPC makes too); the health endpoints stay open."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.state.authorised(
                _header(scope, b"x-api-key"), _header(scope, b"authorization")):
            return await self.app(scope, receive, send)
        response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or "
                                       "'X-API-Key: <key>'", close=_has_body(scope))
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)


class DrainGuard:
    """Once draining began, new work (POST) gets 503 + Retry-After; reads and health still answer."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.state.draining:
            response = error_response(503, "server is shutting down; retry on another replica",
                                      retry_after=self.state.config.retry_after_s, close=True)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitGuard:
    """Reads the whole body up front: over `--max-body-mb` -> 413, slower than `body_timeout_s` -> 408.

    Both answers close the connection (the rest of the body is never read). The route then gets
    the body from memory, so no route can be held open by a slow client.
    """

    def __init__(self, app: ASGIApp, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] in BODYLESS and not _has_body(scope)):
            return await self.app(scope, receive, send)
        config, limit = self.config, self.config.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await error_response(400, "invalid Content-Length", close=True)(scope, receive, send)
            if int(declared) > limit:
                return await error_response(
                    413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes "
                         f"(--max-body-mb {config.max_body_mb:g})", close=True)(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + config.body_timeout_s
        while more:
            try:  # a timeout, not wait_for: no task per read (the body is usually complete already)
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return await error_response(
                    408, f"request body not received within {config.body_timeout_s:g} s "
                         f"({size} bytes arrived)", close=True)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await error_response(
                    413, f"request body is over the limit of {limit} bytes "
                         f"(--max-body-mb {config.max_body_mb:g})",
                    close=True)(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def guarded(app: ASGIApp, state: ServerState) -> ASGIApp:
    """The ASGI application to run: the app behind the guard middlewares (outermost first)."""
    inner: ASGIApp = DrainGuard(BodyLimitGuard(app, state.config), state)
    if state.config.api_key:
        inner = ApiKeyGuard(inner, state)
    return Accounting(inner, state)
