"""`toolkit info`: the card and the facts of any artifact, read as cheaply as the format allows.

ONNX files are read with `onnx` alone (weights left on disk), never torch; TensorRT engines are
described from their sidecar card; TorchScript and checkpoints need torch, as they must.
(Named artifact_info, not inspect, so it can never shadow the standard library's `inspect`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .card import load_sidecar
from .errors import ModelFormatError
from .runtime.metadata import ONNX_PRECISION_KEY, card_from_props, first_line
from .runtime.registry import detect_format, triton_model_file


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    companions = [p for p in path.parent.glob(path.name + ".data") if p.is_file()]
    return path.stat().st_size + sum(p.stat().st_size for p in companions)


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _onnx_facts(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends
        raise ModelFormatError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    if not model.graph.node:
        raise ModelFormatError(f"{path}: not a readable ONNX file (empty graph)")
    props = {p.key: p.value for p in model.metadata_props}
    ops = {n.op_type for n in model.graph.node}
    precision = props.get(ONNX_PRECISION_KEY) or (
        "int8" if "QuantizeLinear" in ops else
        "fp16" if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) else "fp32")

    def dtype(elem: int) -> str:
        try:
            return str(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, ValueError):
            return "?"

    return {
        "card": card_from_props(props, path).to_dict(),
        "precision": precision,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": _dims(i), "dtype": dtype(i.type.tensor_type.elem_type)}
                   for i in model.graph.input],
        "outputs": [{"name": o.name, "shape": _dims(o), "dtype": dtype(o.type.tensor_type.elem_type)}
                    for o in model.graph.output],
        "nodes": len(model.graph.node),
        "calibration": props.get("toolkit.calibration"),
    }


def _torch_facts(path: Path, fmt: str) -> dict[str, Any]:
    from .runtime.registry import open_model

    with open_model(path) as runner:
        card = runner.card
    return {"card": card.to_dict(), "precision": "fp32",
            "inputs": [{"name": "input", "shape": ["batch", *card.input_size], "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": ["batch", card.num_classes], "dtype": "float32"}]}


def _tensorrt_facts(path: Path) -> dict[str, Any]:
    card = load_sidecar(path)
    if card is None:
        raise ModelFormatError(f"{path}: no sidecar card {path.name}.card.json beside the engine")
    engine = dict(card.extra.get("tensorrt") or {})  # written by export/tensorrt.py
    return {"card": card.to_dict(), "precision": engine.get("precision", "?"),
            "tensorrt_version": engine.get("version"), "gpu": engine.get("gpu"),
            "compute_capability": engine.get("compute_capability"), "profile": engine.get("profile"),
            "inputs": [{"name": "input", "shape": ["batch", *card.input_size], "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": ["batch", card.num_classes], "dtype": "float32"}]}


def describe_artifact(model: str | Path) -> dict[str, Any]:
    """Card, format, precision, input/output shapes, opset or TensorRT version, size in bytes."""
    if str(model).startswith(("http://", "https://")):
        from .runtime.registry import open_model

        with open_model(model, backend="remote") as runner:
            return {"path": str(model), "format": "remote", "card": runner.card.to_dict(), **runner.describe()}
    path = Path(model)
    fmt = detect_format(path)
    facts: dict[str, Any] = {"path": str(path), "format": fmt}
    target = triton_model_file(path) if path.is_dir() else path
    if path.is_dir():
        facts["triton_model"] = str(target.parent.parent)
        facts["model_file"] = str(target)
    if fmt == "onnx":
        facts.update(_onnx_facts(target))
    elif fmt == "tensorrt":
        facts.update(_tensorrt_facts(target))
    else:
        facts.update(_torch_facts(target, fmt))
    facts["size_bytes"] = _size(path)
    return facts
