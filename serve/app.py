"""FastAPI routes: /predict, /evaluate, the Open Inference Protocol v2 endpoints, /metrics and the page.

`create_app(runner, config)` builds the app around one opened Runner. Readiness is honest: the
model is warmed up in the background and `/v2/health/ready` says 503 until that finished, and again
once draining began. Every client mistake is a 4xx with `{"error": ...}`; the guard middleware
applies the body limit, the API key and draining before any route runs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.errors import InputError, ToolkitError
from toolkit.runtime.base import Runner
from toolkit.v2 import HEADER_LENGTH, decode_request

from . import protocol
from .batcher import BatchedRunner, DynamicBatcher, QueueFullError, QueueTimeoutError
from .config import ServeConfig
from .inputs import (
    PayloadTooLargeError, folder_dataset, labelled_dataset, load_batch, load_uint8, parse_labels, read_zip,
)
from .metrics import RequestTiming, Stats

log = logging.getLogger("toolkit.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/", "/favicon.ico")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


@dataclass
class ServerState:
    """Everything the routes share. `ready` flips after warm-up; `draining` on SIGTERM."""

    config: ServeConfig
    runner: Runner
    stats: Stats = field(default_factory=Stats)
    batcher: DynamicBatcher | None = None
    pool: ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
    ready: bool = False
    draining: bool = False
    warmup_error: str | None = None

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining


class ServiceUnavailable(ToolkitError):
    http_status = 503


class NotFound(ToolkitError):
    http_status = 404


def error_response(status: int, message: str, retry_after: int | None = None, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None and status in (429, 503) else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# --- the guard: body limit, API key, draining, in-flight count (plain ASGI: cheap per request) ----

class Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, config = self.state, self.state.config
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state.stats.record_http(message["status"])
            await send(message)

        async def reply(response: Response) -> None:
            await response(scope, receive, counted_send)

        if config.api_key and path not in OPEN_PATHS and not path.endswith("/ready") and not _authorised(
                headers, config.api_key):
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                           "or 'X-API-Key: <key>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await reply(response)
        is_work = scope["method"] == "POST"
        if is_work and state.draining:
            return await reply(error_response(503, "server is shutting down; retry on another replica",
                                              retry_after=config.retry_after_s))
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await reply(error_response(400, "invalid Content-Length"))
            if int(declared) > config.max_body_bytes:
                return await reply(error_response(
                    413, f"request body of {int(declared)} bytes is over the limit of {config.max_body_bytes} "
                         f"bytes (--max-body-mb {config.max_body_mb:g})"))
        elif is_work:  # chunked: read up to the limit before the route sees anything
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > config.max_body_bytes:
                    return await reply(error_response(
                        413, f"request body is over the limit of {config.max_body_bytes} bytes "
                             f"(--max-body-mb {config.max_body_mb:g})"))
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay
        if not is_work:
            return await self.app(scope, receive, counted_send)
        state.stats.in_flight += 1
        try:
            await self.app(scope, receive, counted_send)
        finally:
            state.stats.in_flight -= 1


def _authorised(headers: dict[str, str], key: str) -> bool:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


# --- the app -----------------------------------------------------------------------------------

def create_app(runner: Runner, config: ServeConfig) -> FastAPI:
    """The server around one opened Runner (the caller keeps ownership and closes it)."""
    state = ServerState(config=config, runner=runner)
    card = runner.card

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        state.loop = asyncio.get_running_loop()
        state.pool = ThreadPoolExecutor(max_workers=max(1, config.decode_workers), thread_name_prefix="toolkit-decode")
        state.batcher = DynamicBatcher(runner, state.stats, max_batch_size=config.max_batch_size,
                                       max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                                       timeout_s=config.timeout_s)
        await state.batcher.start()
        warm = asyncio.create_task(_warm_up(state))
        try:
            yield
        finally:
            warm.cancel()
            await state.batcher.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="toolkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.toolkit = state

    # --- errors: always {"error": ...}, never a 500 for the client's mistake ---------------------

    @app.exception_handler(ToolkitError)
    async def toolkit_error(_: Request, exc: ToolkitError) -> JSONResponse:
        return error_response(exc.http_status, str(exc), retry_after=config.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log")

    def check_model(name: str, version: str | None = None) -> None:
        if name != config.name or (version not in (None, "", config.version)):
            shown = name if version in (None, "") else f"{name} version {version}"
            raise NotFound(f"unknown model {shown!r}; this server serves {config.name!r} version {config.version}")

    def require_ready() -> DynamicBatcher:
        if state.draining:
            raise ServiceUnavailable("server is shutting down")
        if not state.ready or state.batcher is None:
            raise ServiceUnavailable(f"model is not ready yet{f' ({state.warmup_error})' if state.warmup_error else ''}")
        return state.batcher

    async def in_pool(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert state.loop is not None
        return await state.loop.run_in_executor(state.pool, lambda: func(*args, **kwargs))

    async def counted(work: Callable[[RequestTiming], Awaitable[Response]]) -> Response:
        """Run one inference request and account for it as Triton does (success/failure, phases)."""
        timing, started = RequestTiming(), time.perf_counter()
        try:
            response = await work(timing)
        except QueueFullError:
            state.stats.record_failure("REJECTED", time.perf_counter() - started)
            raise
        except QueueTimeoutError:
            state.stats.record_failure("CANCELED", time.perf_counter() - started)
            raise
        except ToolkitError:
            state.stats.record_failure("OTHER", time.perf_counter() - started)
            raise
        except Exception:
            state.stats.record_failure("BACKEND", time.perf_counter() - started)
            raise
        if response.status_code < 400:
            state.stats.record_success(time.perf_counter() - started, timing)
        else:
            state.stats.record_failure("OTHER", time.perf_counter() - started)
        return response

    # --- page, health, metadata ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text("utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return protocol.server_metadata()

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if state.serving:
            return JSONResponse({"ready": True})
        reason = "draining" if state.draining else (state.warmup_error or "warming up")
        return JSONResponse({"ready": False, "error": f"not ready: {reason}"}, status_code=503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        check_model(name, version)
        return protocol.model_metadata(config, card, runner.backend)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        check_model(name, version)
        if state.serving:
            return JSONResponse({"name": name, "ready": True})
        return JSONResponse({"name": name, "ready": False}, status_code=503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        check_model(name, version)
        return protocol.model_config(config, card, runner.backend)

    @app.get("/v2/models/stats")
    async def all_stats() -> dict[str, Any]:
        return state.stats.v2_statistics(config.name, config.version)

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None) -> dict[str, Any]:
        check_model(name, version)
        return state.stats.v2_statistics(config.name, config.version)

    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, str]]:
        status = "READY" if state.serving else ("UNAVAILABLE" if state.draining else "LOADING")
        return [{"name": config.name, "version": config.version, "state": status, "reason": ""}]

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if state.batcher is not None:
            state.stats.pending = state.batcher.pending
        return PlainTextResponse(state.stats.prometheus(config.name, config.version),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- v2 infer --------------------------------------------------------------------------------

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        check_model(name, version)
        batcher = require_ready()

        async def work(timing: RequestTiming) -> Response:
            began = time.perf_counter()
            body = _decompress(await request.body(), request.headers.get("content-encoding"), config.max_body_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > 65536 and header_length is None:  # big JSON tensors parse off the loop
                parsed = await in_pool(decode_request, body, header_length)
            else:
                parsed = decode_request(body, header_length)
            batch = protocol.input_batch(parsed, card)
            timing.input_s = time.perf_counter() - began
            logits = await batcher.infer(batch, timing)
            began = time.perf_counter()
            payload, length = protocol.infer_response(parsed, logits, config, card)
            timing.output_s = time.perf_counter() - began
            if length is None:
                return Response(payload, media_type="application/json")
            return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

        return await counted(work)

    # --- /predict ---------------------------------------------------------------------------------

    async def uploads(request: Request, max_files: int) -> tuple[list[tuple[str, bytes]], list[str], Any]:
        """(name, bytes) of uploaded files, the 'labels' fields, and the form (None for a raw body)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=max_files, max_fields=max_files + 16)
            except StarletteHTTPException as exc:
                raise InputError(f"invalid multipart body: {exc.detail}") from None
            except Exception as exc:  # noqa: BLE001 - a malformed body is the client's mistake
                raise InputError(f"invalid multipart body: {exc}") from None
            files, labels = [], []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.append((value.filename or key, await value.read()))
                elif key in ("labels", "label"):
                    labels.append(value)
            return files, labels, form
        if content_type.startswith(("application/x-www-form-urlencoded", "application/json", "text/")):
            raise UnsupportedMediaError(f"unsupported Content-Type {content_type!r}: send multipart/form-data files "
                                  "or the raw image bytes as the body")
        body = await request.body()
        return ([(request.headers.get("x-filename") or "body", body)] if body else []), [], None

    async def decode_all(files: list[tuple[str, bytes]], normalise: bool = False) -> list[np.ndarray | ToolkitError]:
        """Each file decoded in the pool: uint8 HxWx3, or float32 (1,3,H,W) when `normalise`."""
        load = load_batch if normalise else load_uint8

        async def one(name: str, data: bytes) -> np.ndarray | ToolkitError:
            try:
                return await in_pool(load, data, card, max_pixels=config.max_pixels, name=name)
            except ToolkitError as exc:
                return exc

        return list(await asyncio.gather(*(one(n, d) for n, d in files)))

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 5) -> Response:
        batcher = require_ready()
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        k = min(top_k, card.num_classes)

        async def work(timing: RequestTiming) -> Response:
            from toolkit.evaluate import softmax, top_k_entries

            began = time.perf_counter()
            files, _, _ = await uploads(request, config.max_images)
            if not files:
                raise InputError("no image: send multipart/form-data with one or more files, or the image bytes as "
                                 "the request body")
            if len(files) > config.max_images:
                raise PayloadTooLargeError(f"{len(files)} images in one request; the limit is {config.max_images}")
            decoded = await decode_all(files, normalise=True)
            good = [i for i, value in enumerate(decoded) if isinstance(value, np.ndarray)]
            answers: dict[int, dict[str, Any]] = {}
            if good:
                batch = decoded[good[0]] if len(good) == 1 else np.concatenate([decoded[i] for i in good])
                timing.input_s = time.perf_counter() - began
                logits = await batcher.infer(batch, timing)
                began = time.perf_counter()
                probabilities = softmax(logits)
                for row, i in enumerate(good):
                    answers[i] = {"input": files[i][0], "top": top_k_entries(probabilities[row], card.class_names, k)}
            results = []
            for i, (name, _) in enumerate(files):
                value = decoded[i]
                results.append(answers[i] if i in answers else
                               {"input": name, "error": str(value), "status": getattr(value, "http_status", 400)})
            timing.output_s = time.perf_counter() - began
            if good:
                return JSONResponse({"model": config.name, "predictions": results})
            first = decoded[0]
            assert isinstance(first, ToolkitError)
            return JSONResponse({"error": str(first), "model": config.name, "predictions": results},
                                status_code=first.http_status)

        return await counted(work)

    # --- /evaluate --------------------------------------------------------------------------------

    @app.post("/evaluate")
    async def evaluate_route(request: Request) -> Response:
        require_ready()
        from toolkit.evaluate import evaluate

        files, label_fields, form = await uploads(request, 100_000)
        content_type = request.headers.get("content-type", "")
        zips = [(n, d) for n, d in files if n.lower().endswith(".zip") or (form is None and content_type in ZIP_TYPES)]
        if zips:
            if len(files) != 1:
                raise InputError("send either one zip of class folders, or image files with their labels")
            folders, files = await in_pool(read_zip, zips[0][1], max_bytes=8 * config.max_body_bytes)
        elif not files:
            raise InputError("no images: send multipart files with a 'labels' field each (class name or index), "
                             "or a zip of class-per-folder images")
        else:
            folders = None
            labels = parse_labels(label_fields, len(files), card.class_names)
        decoded = await decode_all(files)
        errors = [value for value in decoded if isinstance(value, ToolkitError)]
        if errors:  # evaluation needs every image; the answer names the first bad one
            first = next((e for e in errors if e.http_status == 413), errors[0])
            raise type(first)(f"{len(errors)} of {len(files)} images cannot be used: {first}")
        images = [value for value in decoded if isinstance(value, np.ndarray)]
        if folders is not None:
            dataset = folder_dataset(images, folders, card.class_names)
        else:
            dataset = labelled_dataset(images, labels, card.class_names)
        assert state.batcher is not None and state.loop is not None
        proxy = BatchedRunner(state.batcher, state.loop)
        report = await state.loop.run_in_executor(
            None, lambda: evaluate(proxy, dataset, batch_size=config.max_batch_size))
        result = report.to_dict()
        result["server_model"] = config.name
        return JSONResponse(_jsonable(result))

    return app


class UnsupportedMediaError(InputError):
    http_status = 415


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays inside the metrics dict -> plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Content-Encoding gzip/deflate request bodies (tritonclient can send them), capped at `limit`."""
    if not encoding or encoding.lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise UnsupportedMediaError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"request body is not valid {encoding} ({exc})") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise PayloadTooLargeError(f"decompressed body is over the limit of {limit} bytes")
    return out


async def _warm_up(state: ServerState) -> None:
    """Run the model once at batch 1 and once at the largest batch before saying ready."""
    assert state.batcher is not None
    card = state.runner.card
    try:
        if state.config.warmup:
            loop = asyncio.get_running_loop()
            for size in sorted({1, max(1, state.config.max_batch_size)}):
                batch = np.zeros((size, *card.input_size), dtype=np.float32)
                await loop.run_in_executor(None, state.batcher.run_sync, batch)
        state.ready = True
        log.info("model %s ready", state.config.name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported by readiness, not a crash
        state.warmup_error = f"warm-up failed: {exc}"
        log.error("%s", state.warmup_error)


def guarded(app: FastAPI) -> Guard:
    """The ASGI application to run: the app behind the guard middleware."""
    return Guard(app, app.state.toolkit)
