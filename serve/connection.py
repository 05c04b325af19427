"""Connection limits: uvicorn's h11 protocol with a header-size cap, a header timeout, a connection cap.

uvicorn's default (httptools) parser reads a request head of any size, and neither parser times
out a client that stalls mid-headers (the keep-alive timer is reset by every byte). This protocol:

- caps the request line + headers at `max_header_kb` (h11's incomplete-event limit) -> 431;
- gives the request head `header_timeout_s` from the connection's start or the previous
  response, however slowly bytes trickle in -> 408 and close (an idle connection just closes);
- refuses connections beyond `max_connections` at once -> 503 and close;

and answers all of them as JSON `{"error": ...}` with `Connection: close`, like every other error.
The body's own limits (size, read timeout) are the `BodyLimitGuard`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from .config import ServeConfig

log = logging.getLogger("toolkit.serve")


class _Connection(h11.Connection):
    """h11's connection with a hard cap on the request head, remembering its last protocol error.

    h11 applies its size limit only while a head is incomplete: a 128 KB head that arrives in one
    read is accepted whole. This cap also measures complete heads.
    """

    last_error: h11.RemoteProtocolError | None = None

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request) and _head_size(event) > self.max_head_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


def _head_size(request: h11.Request) -> int:
    """Bytes of a request head as sent (request line, headers, line ends)."""
    headers = sum(len(name) + len(value) + 4 for name, value in request.headers)
    return len(request.method) + len(request.target) + 12 + headers


def _raw_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    limits: ServeConfig = ServeConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(self.limits.max_header_kb * 1024)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refused a connection: %d open (max_connections %d)", len(self.connections) - 1,
                        self.limits.max_connections)
            self._refuse(503, f"too many open connections (limit {self.limits.max_connections}); retry later")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        """A malformed request head: 431 when it is too large, else 400, both as JSON, then close."""
        error = getattr(self.conn, "last_error", None)
        status = 431 if error is not None and error.error_status_hint == 431 else 400
        if status == 431:
            message = f"request line and headers are over the limit of {self.limits.max_header_kb} KB"
        else:
            message = f"invalid HTTP request ({error or msg})"
        self._cancel_head_timer()
        self._refuse(status, message)

    def _refuse(self, status: int, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, message))
            self.transport.close()

    # --- the request-head timer --------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the head arrived (a request is in progress): nothing to do
        if self.conn.trailing_data[0]:  # part of a head arrived, too slowly
            self._refuse(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        else:  # an idle connection: close it quietly, as the keep-alive timeout would
            self.transport.close()


def protocol_for(config: ServeConfig) -> type[H11Protocol]:
    """The uvicorn `http=` protocol class carrying this server's limits."""
    return type("ToolkitH11Protocol", (GuardedH11Protocol,), {"limits": config})
