"""The two inference routes straight from ASGI: raw-body `POST /predict` and `POST /v2/.../infer`.

FastAPI's per-request machinery (routing over ~40 patterns, dependency injection, the Request object,
its middleware stack) costs more CPU than the rest of a CIFAR-size request together. `HotPath` sits
inside the guards (`serve.guards`: API key, drain, body limit and accounting have already run, the
body is in memory) and answers the common shapes of these two requests by calling the very functions
the FastAPI routes call (`answer_predict`, `answer_infer`); anything else — multipart uploads, an
unusual query string, other routes — goes on to FastAPI unchanged, so there is one implementation
and the fast path cannot answer differently from the documented routes.
"""

from __future__ import annotations

import re
from typing import Any

from toolkit.errors import ToolkitError

from .errors import error_answer, internal_error_answer
from .guards import ASGIApp, Message, Receive, Scope, Send
from .routes.predict import answer_predict, check_raw_type, raw_upload
from .routes.v2 import answer_infer
from .state import ServerState

TOP_K_DEFAULT = 5
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_.-]{1,200}")  # a model name needing no URL decoding


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by lowercase name (uvicorn lowercases them); a repeated one: its first, as
    Starlette's `Request.headers.get` reads it."""
    return dict(reversed(scope["headers"]))


def _predict_query(query: bytes) -> tuple[int, str | None] | None:
    """(top_k, model) from a query string of plain `top_k=<int>` and `model=<name>` parameters; None:
    anything else, left to FastAPI (which also answers a malformed one)."""
    top_k, model = TOP_K_DEFAULT, None
    for part in query.split(b"&") if query else ():
        name, _, value = part.partition(b"=")
        if name == b"top_k" and value.isdigit() and len(value) <= 9:
            top_k = int(value)
        elif name == b"model" and value and _PLAIN_NAME.fullmatch(value):
            model = value.decode("ascii")
        else:
            return None
    return top_k, model


def _v2_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) of `/v2/models/{name}[/versions/{version}]/infer`, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer" and parts[3]:
        return parts[3], None
    if len(parts) == 7 and parts[4] == "versions" and parts[6] == "infer" and parts[3] and parts[5]:
        return parts[3], parts[5]
    return None


class HotPath:
    """Answers raw-body /predict and v2 infer itself; hands every other request to `app`."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/predict":
                query = _predict_query(scope["query_string"])
                headers = _headers(scope)
                content_type = headers.get(b"content-type", b"").decode("latin-1")
                if query is not None and not content_type.startswith("multipart/"):
                    return await self._predict(scope, receive, send, *query, content_type, headers)
            elif path.startswith("/v2/models/") and not scope["query_string"]:
                target = _v2_target(path)
                if target is not None:
                    return await self._infer(scope, receive, send, *target)
        return await self.app(scope, receive, send)

    async def _predict(self, scope: Scope, receive: Receive, send: Send, top_k: int, model: str | None,
                       content_type: str, headers: dict[bytes, bytes]) -> None:
        async def files() -> list[tuple[str, bytes]]:
            check_raw_type(content_type)
            name = headers.get(b"x-filename")
            return raw_upload(None if name is None else name.decode("latin-1"), await _body(receive))

        await self._answer(scope, receive, send, lambda: answer_predict(self.state, top_k, files, model))

    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str,
                     version: str | None) -> None:
        headers = _headers(scope)
        length, encoding = headers.get(b"inference-header-content-length"), headers.get(b"content-encoding")

        async def body() -> bytes:
            return await _body(receive)

        await self._answer(scope, receive, send, lambda: answer_infer(
            self.state, name, version, body, None if length is None else length.decode("latin-1"),
            None if encoding is None else encoding.decode("latin-1")))

    async def _answer(self, scope: Scope, receive: Receive, send: Send, answer: Any) -> None:
        """Run `answer()` and send its response; errors are answered as the app's handlers answer them."""
        try:
            response = await answer()
        except ToolkitError as exc:
            response = error_answer(exc, self.state.config)
        except Exception as exc:  # noqa: BLE001 - the server's own failure: a 500, the connection kept
            response = internal_error_answer(exc)
        await response(scope, receive, send)


async def _body(receive: Receive) -> bytes:
    """The whole body (the body-limit guard already read it and replays it as one message)."""
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
