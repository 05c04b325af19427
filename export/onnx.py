"""ONNX: dynamo exporter (opset >= 18) with the legacy exporter as fallback, onnxslim, full check.

The card travels in `metadata_props["toolkit.card"]`, the artifact facts (precision, exporter,
calibration, I/O) in `["toolkit.artifact"]` (toolkit/artifacts.py).
fp16 files hold fp16 weights and activations behind fp32 inputs/outputs (Cast nodes at the edges),
so every runner feeds them the same float32 batches. Models over 2 GB keep weights in
`<name>.onnx.data` beside the file. Every write lands atomically after `onnx.checker` passed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from toolkit.artifacts import PRECISIONS, ArtifactFacts, onnx_metadata, onnx_tensor
from toolkit.card import ModelCard
from toolkit.errors import ExportError, UsageError, first_line
from toolkit.fileio import atomic_path, os_error, staging_dir
from toolkit.names import INPUT_NAME, OUTPUT_NAME

DEFAULT_OPSET = 18
MIN_OPSET = 11
DYNAMO_MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB ceiling, less room for the graph


def check_opset(opset: int) -> int:
    """The opset if the installed onnx can write it (and the exporters can target it)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UsageError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} can write "
                         f"(at most {newest}); pick {MIN_OPSET}..{newest} or upgrade onnx")
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is too old; pick {MIN_OPSET}..{newest}")
    return opset


def _dynamo(model: Any, example: Any, opset: int, dynamic: bool) -> Any:
    import torch

    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=shapes, verbose=False)
    if program is None:  # torch returns None only when writing to a file, which this call does not
        raise ExportError("the dynamo exporter returned no program")
    program.optimize()
    return program.model_proto


def _legacy(model: Any, example: Any, opset: int, dynamic: bool) -> Any:
    import onnx
    import torch

    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (example,), buffer,  # type: ignore[arg-type]  # file objects work too
                      dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def to_proto(model: Any, card: ModelCard, *, opset: int = DEFAULT_OPSET, dynamic: bool = True,
             batch_size: int = 1) -> tuple[Any, str]:
    """fp32 ModelProto of an eval-mode network and the exporter that made it ("dynamo" | "legacy")."""
    import torch

    check_opset(opset)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    model = model.eval()
    # A dynamic export traces at batch 2: batch 1 would let torch.export specialise the dimension.
    example = torch.randn(2 if dynamic else batch_size, *card.input_size)
    attempts = [("dynamo", _dynamo), ("legacy", _legacy)]
    if opset < DYNAMO_MIN_OPSET:
        attempts = attempts[1:]
    errors = []
    for name, exporter in attempts:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                return exporter(model, example, opset, dynamic), name
        except Exception as exc:  # noqa: BLE001 - try the next exporter, report all if none works
            errors.append(f"{name}: {first_line(exc)}")
    raise ExportError("ONNX export failed (" + "; ".join(errors) + ")")


def simplify(proto: Any) -> Any:
    """onnxslim: constant folding, dead-node removal, fusion. The unsimplified graph if slim fails."""
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(proto)
    except Exception:  # noqa: BLE001 - simplification is an optimisation, never a reason to fail
        return proto
    return slim if slim is not None else proto


def to_fp16(proto: Any) -> Any:
    """fp16 weights and activations; inputs and outputs stay fp32 behind Cast nodes."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    return topological_sort(converted)


def topological_sort(proto: Any) -> Any:
    """Order nodes so each follows its producers (the fp16 converter appends its input Casts last)."""
    graph = proto.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in known for name in n.input)]
        if not ready:
            raise ExportError("the ONNX graph has a cycle or a missing input; cannot order its nodes")
        for node in ready:
            known.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    return proto


def facts_of(proto: Any, precision: str, *, exporter: str | None = None,
             calibration: str | None = None) -> ArtifactFacts:
    """The facts of an ONNX graph about to be written: its I/O and opset, and how it was made."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    initializers = {t.name for t in proto.graph.initializer}
    return ArtifactFacts(
        "onnx", precision=precision, exporter=exporter, calibration=calibration,
        inputs=tuple(onnx_tensor(v) for v in proto.graph.input if v.name not in initializers),
        outputs=tuple(onnx_tensor(v) for v in proto.graph.output),
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
    )


def set_metadata(proto: Any, card: ModelCard, facts: ArtifactFacts) -> Any:
    """Stamp card and facts; other metadata stays, the pre-facts `toolkit.precision` key goes."""
    entries = {p.key: p.value for p in proto.metadata_props
               if p.key not in ("toolkit.precision", "toolkit.calibration")}
    entries.update(onnx_metadata(card, facts))
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = proto.producer_name or "resnet-toolkit"
    return proto


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError
        raise ExportError(f"the exported ONNX fails onnx.checker: {first_line(exc)}") from None


def save(proto: Any, card: ModelCard, output: str | Path, facts: ArtifactFacts) -> Path:
    """Stamp card and facts, check, and write atomically (with `<name>.data` when over 2 GB)."""
    import onnx

    output = Path(output)
    set_metadata(proto, card, facts)
    if proto.ByteSize() < EXTERNAL_DATA_BYTES:
        with atomic_path(output) as tmp:
            onnx.save_model(proto, str(tmp))
            _check(tmp)
        return output
    data_name = output.name + ".data"
    staging = staging_dir(output, "tmp")  # a killed export's leftovers are removed by the next one
    try:
        onnx.save_model(proto, str(staging / output.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        _check(staging / output.name)
        os.replace(staging / data_name, output.parent / data_name)
        os.replace(staging / output.name, output)
    except OSError as exc:  # a full disk is one line: "no space left on <folder>"
        raise os_error(exc, output.parent) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def export(model: Any, card: ModelCard, output: str | Path, opset: int = DEFAULT_OPSET, dynamic: bool = True,
           batch_size: int = 1, precision: str = "fp32") -> Path:
    """Export an eval-mode network to `output` (fp32 or fp16); int8 goes through `export.quantize`."""
    if precision == "int8":
        raise UsageError("int8 ONNX needs calibration images: use export.quantize (CLI: --calib-dataset)")
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    proto, exporter = to_proto(model, card, opset=opset, dynamic=dynamic, batch_size=batch_size)
    proto = simplify(proto)
    if precision == "fp16":
        proto = to_fp16(proto)
    return save(proto, card, output, facts_of(proto, precision, exporter=f"torch.onnx {exporter}"))
