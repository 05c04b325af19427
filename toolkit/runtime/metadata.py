"""Where artifacts keep their card, and how runners read it back (no torch, no onnx import here).

ONNX files carry the card as JSON under the `metadata_props` key `toolkit.card` and their precision
under `toolkit.precision`; files without a card fall back to a sidecar `*.card.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..card import ModelCard, load_sidecar
from ..errors import DataError, ModelFormatError

ONNX_CARD_KEY = "toolkit.card"
ONNX_PRECISION_KEY = "toolkit.precision"
TORCHSCRIPT_CARD_FILE = "card.json"
PRECISIONS = ("fp32", "fp16", "int8")


def card_from_props(props: Mapping[str, str], path: str | Path) -> ModelCard:
    """The embedded card, else the sidecar; a file with neither says how to get one."""
    text = props.get(ONNX_CARD_KEY)
    try:
        if text:
            return ModelCard.from_json(text)
        card = load_sidecar(path)
    except DataError as exc:
        raise ModelFormatError(f"{path}: its model card is unreadable: {exc}") from None
    if card is None:
        raise ModelFormatError(
            f"{path} carries no model card (metadata '{ONNX_CARD_KEY}' or {Path(path).name}.card.json); "
            "export it with `toolkit export`, or write a card beside it"
        )
    return card


def onnx_props(path: str | Path) -> dict[str, str]:
    """metadata_props of an ONNX file, read without its weights. Corrupt files -> ModelFormatError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on the damage
        raise ModelFormatError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    if not model.graph.node:
        raise ModelFormatError(f"{path}: not a readable ONNX file (empty graph)")
    return {p.key: p.value for p in model.metadata_props}


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
