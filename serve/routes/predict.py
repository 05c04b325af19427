"""The toolkit's own endpoints: `/predict` (top-k per image) and `/evaluate` (metrics over labelled uploads).

Both take the model as `?model=NAME` (required when the server serves several; the page offers the
choice). Uploads are decoded in the decode pool through `serve.inputs` (the toolkit's one decoder
and one preprocessing); inference goes through the model's batcher like every v2 request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.card import ModelCard
from toolkit.errors import InputError, ToolkitError

from ..batcher import BatchedRunner
from ..errors import PayloadTooLargeError, UnsupportedMediaError
from ..inputs import folder_dataset, labelled_dataset, load_batch, load_uint8, parse_labels, read_zip
from ..models import ServedModel
from ..state import ServerState, get_state

State = Annotated[ServerState, Depends(get_state)]
router = APIRouter()
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
MAX_EVALUATE_FILES = 100_000
NOT_IMAGES = ("application/x-www-form-urlencoded", "application/json", "text/")


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
    check_raw_type(content_type)
    return raw_upload(request.headers.get("x-filename"), await request.body()), [], None


def check_raw_type(content_type: str) -> None:
    """A raw body must be the image itself: form, JSON and text bodies are refused (415)."""
    if content_type.startswith(NOT_IMAGES):
        raise UnsupportedMediaError(f"unsupported Content-Type {content_type!r}: send multipart/form-data "
                                    "files or the raw image bytes as the body")


def raw_upload(filename: str | None, body: bytes) -> list[tuple[str, bytes]]:
    """The one upload of a raw image body, named by `X-Filename` (none for an empty body)."""
    return [(filename or "body", body)] if body else []


async def decode_all(state: ServerState, card: ModelCard, files: list[tuple[str, bytes]],
                     normalise: bool = False) -> list[np.ndarray | ToolkitError]:
    """Each file decoded (off the event loop unless small, `ServerState.offload`): uint8 HxWx3, or
    float32 (1,3,H,W) when `normalise`."""
    load = load_batch if normalise else load_uint8
    max_pixels = state.config.max_pixels

    async def one(name: str, data: bytes) -> np.ndarray | ToolkitError:
        try:
            return await state.offload(len(data), load, data, card, max_pixels=max_pixels, name=name)
        except ToolkitError as exc:
            return exc

    if len(files) == 1:  # the common case: no task to gather
        return [await one(*files[0])]
    return list(await asyncio.gather(*(one(n, d) for n, d in files)))


@router.post("/predict")
async def predict(request: Request, state: State, top_k: int = 5, model: str | None = None) -> Response:
    async def files() -> list[tuple[str, bytes]]:
        return (await uploads(request, state.config.max_images))[0]

    return await answer_predict(state, top_k, files, model)


Decoded = tuple[list[tuple[str, bytes]], list["np.ndarray | ToolkitError"]]


async def answer_predict(state: ServerState, top_k: int,
                         read_files: Callable[[], Awaitable[list[tuple[str, bytes]]]],
                         model_name: str | None = None) -> Response:
    """The /predict answer: top-k per uploaded image, a bad image answered in its own entry; the model
    named by `?model=` (needed when the server serves several). Served by the route above and, for raw
    image bodies, by `serve.hotpath` without FastAPI's machinery."""
    model = state.pick(model_name)
    config = state.config
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")

    async def decode(model: ServedModel) -> tuple[Decoded, np.ndarray | None]:
        files = await read_files()
        if not files:
            raise InputError("no image: send multipart/form-data with one or more files, or the image bytes "
                             "as the request body")
        if len(files) > config.max_images:
            raise PayloadTooLargeError(f"{len(files)} images in one request; the limit is "
                                       f"{config.max_images}")
        decoded = await decode_all(state, model.card, files, normalise=True)
        good = [value for value in decoded if isinstance(value, np.ndarray)]
        batch = None if not good else good[0] if len(good) == 1 else np.concatenate(good)
        return (files, decoded), batch

    def encode(model: ServedModel, parsed: Decoded, logits: np.ndarray | None) -> Response:
        from toolkit.evaluate import softmax, top_k_entries

        files, decoded = parsed
        card = model.card
        probabilities = softmax(logits) if logits is not None else None
        results: list[dict[str, Any]] = []
        row = 0
        for (name, _), value in zip(files, decoded, strict=True):
            if isinstance(value, np.ndarray):
                assert probabilities is not None
                top = top_k_entries(probabilities[row], card.class_names, min(top_k, card.num_classes))
                results.append({"input": name, "top": top})
                row += 1
            else:
                results.append({"input": name, "error": str(value), "status": value.http_status})
        if logits is not None:
            return JSONResponse({"model": model.name, "predictions": results})
        first = decoded[0]
        assert isinstance(first, ToolkitError)
        return JSONResponse({"error": str(first), "model": model.name, "predictions": results},
                            status_code=first.http_status)

    return await state.infer(model, decode, encode)


@router.post("/evaluate")
async def evaluate_route(request: Request, state: State, model: str | None = None) -> Response:
    from toolkit.evaluate import evaluate

    served = state.pick(model)
    config, card = state.config, served.card
    files, label_fields, form = await uploads(request, MAX_EVALUATE_FILES)
    content_type = request.headers.get("content-type", "")
    raw_zip = form is None and content_type in ZIP_TYPES
    zips = [(n, d) for n, d in files if n.lower().endswith(".zip") or raw_zip]
    if zips:
        if len(files) != 1:
            raise InputError("send either one zip of class folders, or image files with their labels")
        folders, files = await state.in_pool(read_zip, zips[0][1], max_bytes=config.max_zip_bytes,
                                             max_member_bytes=config.max_body_bytes,
                                             max_files=MAX_EVALUATE_FILES)
    elif not files:
        raise InputError("no images: send multipart files with a 'labels' field each (class name or index), "
                         "or a zip of class-per-folder images")
    else:
        folders = None
        labels = parse_labels(label_fields, len(files), card.class_names)
    decoded = await decode_all(state, card, files)
    errors = [value for value in decoded if isinstance(value, ToolkitError)]
    if errors:  # evaluation needs every image; the answer names the first bad one
        first = next((e for e in errors if e.http_status == 413), errors[0])
        raise type(first)(f"{len(errors)} of {len(files)} images cannot be used: {first}")
    images = [value for value in decoded if isinstance(value, np.ndarray)]
    if folders is not None:
        dataset = folder_dataset(images, folders, card.class_names)
    else:
        dataset = labelled_dataset(images, labels, card.class_names)
    assert state.loop is not None
    proxy = BatchedRunner(served, state.loop)
    served.enter()  # an unload waits for the evaluation, as for any request
    try:
        report = await state.loop.run_in_executor(
            None, lambda: evaluate(proxy, dataset, batch_size=max(1, served.settings.batch_limit)))
    finally:
        served.leave()
    result = report.to_dict()
    result["server_model"] = served.name
    return JSONResponse(_jsonable(result))


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
