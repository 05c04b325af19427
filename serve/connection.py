"""Connection limits: uvicorn's httptools protocol with a header-size cap, a header timeout, a connection cap.

httptools (llhttp, the parser of Node.js) is uvicorn's fast parser: about half h11's CPU per request,
which matters when a worker's whole budget is a few hundred microseconds. But neither parser caps a
request head, and neither times out a client that stalls mid-headers (the keep-alive timer is reset
by every byte). This protocol:

- caps the request line + headers at `max_header_kb` -> 431, counting the bytes as they arrive (before
  the parser buffers them), so a 64 MB header line is refused after its first 64 KB;
- gives the request head `header_timeout_s` from the connection's start or the previous
  response, however slowly bytes trickle in -> 408 and close (an idle connection just closes);
- refuses connections beyond `max_connections` at once -> 503 and close;
- answers a malformed request with 400 naming the parser's reason;
- sends each response's head and body in one write (uvicorn writes them separately: two sends, two
  TCP segments, and the client woken twice, for every small JSON answer);

all as JSON `{"error": ...}` with `Connection: close`, like every other error. The body's own limits
(size, read timeout) are the `BodyLimitGuard`'s.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import ServeConfig

log = logging.getLogger("toolkit.serve")
HEAD_END = b"\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 "


def _raw_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _HeadWithBody:
    """The transport as one response's writer sees it: its first write (the head) is held back and sent
    with the next (the body, which uvicorn always writes for a method other than HEAD, empty or not);
    closing sends a held head first; an interim `100 Continue` is never held. Everything else is the
    transport's."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is None:
            if data.startswith(CONTINUE):  # an interim answer: it must go at once
                self._transport.write(data)
            else:
                self._head = data
            return
        head, self._head = self._head, b""
        self._transport.write(head + data if head else data)

    def close(self) -> None:
        if self._head:
            self._transport.write(self._head)
            self._head = b""
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's httptools protocol behind this server's head, time and connection limits."""

    limits: ServeConfig = ServeConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head = self.limits.max_header_kb * 1024
        self._in_head = True  # from a request's end (or the connection's start) to the next head's end
        self._head_bytes = 0  # bytes received while in a head
        self._tail = b""  # the last bytes of the previous read: a head's end may straddle two reads
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

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_too_large(data):
            self._cancel_head_timer()
            limit = self.limits.max_header_kb
            self._refuse(431, f"request line and headers are over the limit of {limit} KB")
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket or h2c here: the request is answered as plain HTTP/1.1
        except httptools.HttpParserError as exc:
            self._cancel_head_timer()
            self._refuse(400, f"invalid HTTP request ({exc})")

    def _head_too_large(self, data: bytes) -> bool:
        """Count a head's bytes before the parser sees them; past the cap, look for the head's end in
        this read (what follows it is body, which is not the head's size)."""
        seen = self._head_bytes + len(data)
        if seen <= self._max_head:
            self._head_bytes = seen
            self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
            return False
        window = self._tail + data
        end = window.find(HEAD_END)
        return end < 0 or seen - len(window) + end + len(HEAD_END) > self._max_head

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()  # the head arrived; the timer starts again after the response
        super().on_headers_complete()
        if self.scope["method"] != "HEAD":  # a HEAD response has no body write to join its head to
            self.cycle.transport = _HeadWithBody(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, f"invalid HTTP request ({msg})")

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
        if self.transport.is_closing() or not self._in_head:
            return  # the head arrived (a request is in progress): nothing to do
        if self._head_bytes:  # part of a head arrived, too slowly
            self._refuse(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        else:  # an idle connection: close it quietly, as the keep-alive timeout would
            self.transport.close()


def protocol_for(config: ServeConfig) -> type[GuardedHttpToolsProtocol]:
    """The uvicorn `http=` protocol class carrying this server's limits."""
    return type("ToolkitHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": config})
