"""`toolkit export`, `benchmark` and `info`: writing artifacts, comparing them, describing them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from ..names import CALIB_METHODS, EXPORT_FORMATS, EXPORT_PRECISIONS
from .common import (
    AllowPickleOpt,
    ArchOpt,
    Choice,
    DataDirOpt,
    DatasetName,
    DatasetOpt,
    DeviceName,
    DeviceOpt,
    JsonOpt,
    LimitOpt,
    ModelOpt,
    choices,
    console,
    given,
    handles_errors,
    options,
    print_json,
    require_dataset,
    resolve_model,
    value,
)
from .groups import CardOptions, RunPrecision, speed_options

# Choices come from toolkit/names.py, the one list the export pipeline is keyed by.
if TYPE_CHECKING:
    class ExportFormat(Choice): ...
    class Precision(Choice): ...
    class CalibMethod(Choice): ...
else:
    ExportFormat = choices("ExportFormat", EXPORT_FORMATS)
    Precision = choices("Precision", EXPORT_PRECISIONS)
    CalibMethod = choices("CalibMethod", CALIB_METHODS)


CALIB = "int8 calibration"
CHECKS = "Verification against eager PyTorch"
TARGET = "TensorRT and Triton"


@dataclass(frozen=True)
class CalibOptions:
    calib_dataset: Annotated[DatasetName | None, typer.Option(
        help="Labelled images for int8 calibration (train split when there is one) and, held out from "
        "calibration, for verification.", rich_help_panel=CALIB)] = None
    calib_size: Annotated[int, typer.Option(
        min=1, help="Calibration images (class-balanced, seeded).", rich_help_panel=CALIB)] = 512
    calib_method: Annotated[CalibMethod, typer.Option(
        help="int8 range estimation.", rich_help_panel=CALIB)] = CalibMethod["minmax"]


@dataclass(frozen=True)
class CheckOptions:
    """How an export is verified: fp32 by the logits, fp16/int8 by the accuracy change (McNemar)."""

    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Check the artifact against eager PyTorch.",
        rich_help_panel=CHECKS)] = True
    verify_samples: Annotated[int, typer.Option(
        min=1, help="Images used by the parity check.", rich_help_panel=CHECKS)] = 512
    atol: Annotated[float, typer.Option(
        min=0, help="fp32: allowed |diff| on logits (plus rtol * |ref|).", rich_help_panel=CHECKS)] = 1e-4
    rtol: Annotated[float, typer.Option(
        min=0, help="fp32: relative part of the logits tolerance.", rich_help_panel=CHECKS)] = 1e-3
    alpha: Annotated[float | None, typer.Option(
        min=0, max=1, help="fp16/int8: fail when McNemar's test finds the accuracy loss significant at this "
        "level. Default: 0.05.", rich_help_panel=CHECKS, show_default=False)] = None
    min_agreement: Annotated[float | None, typer.Option(
        min=0, max=1, help="fp16/int8: also require this top-1 agreement with fp32 (reported, not gated, "
        "by default).", rich_help_panel=CHECKS)] = None
    max_accuracy_drop: Annotated[float | None, typer.Option(
        min=0, help="fp16/int8: also fail when accuracy drops more than this (0-1), significant or not.",
        rich_help_panel=CHECKS)] = None

    def settings(self) -> dict[str, Any]:
        from export.verify import Tolerances

        gates = given(alpha=self.alpha, min_agreement=self.min_agreement,
                      max_accuracy_drop=self.max_accuracy_drop)
        return {"do_verify": self.verify, "verify_samples": self.verify_samples,
                "tolerances": Tolerances(atol=self.atol, rtol=self.rtol, **gates)}


@dataclass(frozen=True)
class TargetOptions:
    """The options of the engine and repository formats; other formats refuse them by name."""

    max_batch: Annotated[int | None, typer.Option(
        min=1, help="Largest batch of a TensorRT profile, of a pt2/aoti program's batch range, and "
        "Triton's max_batch_size. Default: max(32, "
        "--batch-size).", rich_help_panel=TARGET)] = None
    workspace_gb: Annotated[float | None, typer.Option(
        min=0.1, help="TensorRT builder memory pool (GiB).", rich_help_panel=TARGET)] = None
    timing_cache: Annotated[Path | None, typer.Option(
        help="TensorRT timing cache, read and updated.", rich_help_panel=TARGET)] = None
    name: Annotated[str | None, typer.Option(
        help="Triton model name. Default: the checkpoint's stem.", rich_help_panel=TARGET)] = None


@handles_errors
@options(card=CardOptions, calib=CalibOptions, checks=CheckOptions, target=TargetOptions)
def export(
    card: CardOptions,
    calib: CalibOptions,
    checks: CheckOptions,
    target: TargetOptions,
    model: ModelOpt = None,
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help="Artifact to write.")] = ExportFormat["onnx"],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Destination file, or an existing folder to write <stem>.<ext> in "
        "(for triton: the model repository). Default: beside the checkpoint (model.pt -> model.onnx, "
        "model.int8.onnx, model.ts).")] = None,
    precision: Annotated[Precision, typer.Option(
        help="onnx/tensorrt/triton: fp16/int8 live in the ONNX itself; torchscript/pt2/aoti: fp16/bf16 "
        "weights behind fp32 inputs and outputs.")] = Precision["fp32"],
    opset: Annotated[int | None, typer.Option(
        help="ONNX opset (18+ uses the dynamo exporter, older the legacy one). "
        "Default: 18; 19 for int8.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of a --static export.")] = 1,
    dynamic: Annotated[bool, typer.Option(
        "--dynamic/--static", help="Dynamic batch axis, or fixed --batch-size.")] = True,
    data_dir: DataDirOpt = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (TensorRT needs cuda).")] = "cpu",
    arch: ArchOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to TorchScript, ONNX, torch.export, AOTInductor, TensorRT or Triton, verified.

    Options that belong to other formats (--name for onnx, say) are refused with the valid ones named.
    """
    from export.pipeline import run_export

    if calib.calib_dataset is not None and calib.calib_dataset.value == "folder" and data_dir is None:
        raise UsageError("--calib-dataset folder needs --data-dir pointing at class-per-subfolder images")
    result = run_export(
        resolve_model(model), value(format), output, precision=value(precision), opset=opset,
        batch_size=batch_size, dynamic=dynamic, data_dir=data_dir, device=device,
        calib_dataset=calib.calib_dataset.value if calib.calib_dataset else None, calib_size=calib.calib_size,
        calib_method=value(calib.calib_method), arch=None if arch == "auto" else arch,
        allow_pickle=allow_pickle, card_flags=card.flags() or None, **checks.settings(),
        **given(**asdict(target)),
    )
    if as_json:
        print_json(result.to_dict())
    else:
        _render_export(result)
    result.check()  # VerificationError: one red line, exit 1; the artifact stays aside


def _render_export(result: Any) -> None:
    from rich.markup import escape

    out = console()
    out.print(f"[bold]{result.format}[/] {result.precision} -> {escape(str(result.path))} "
              f"({result.size_bytes / 1e6:.2f} MB, {result.seconds:.1f} s)")
    if result.verify is not None:
        style = "green" if result.verify.passed else "bold red"
        out.print(f"[{style}]verify {escape(result.verify.summary())}[/]")
    else:
        out.print("[yellow]not verified (--no-verify)[/]")


def _split_list(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values as one list."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()] if values else None


@handles_errors
@options(card=CardOptions)
def benchmark_command(
    card: CardOptions,
    model: ModelOpt = None,
    formats: Annotated[list[str] | None, typer.Option("--formats", help="Formats to try (repeat or comma-"
                       "separate): torch, torchscript, pt2, aoti, onnx, openvino, tensorrt. Default: "
                       "all.")] = None,
    precisions: Annotated[list[str] | None, typer.Option("--precisions", help="Precisions of the exported "
                          "ONNX files: fp32, fp16, int8 (repeat or comma-separate). Default: all.")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    batch_sizes: Annotated[str, typer.Option(
        help="Batch sizes to time for throughput (comma-separated).")] = "32,128",
    device: DeviceOpt = DeviceName.cpu,
    output_dir: Annotated[Path | None, typer.Option(help="Keep the exported artifacts, benchmark.json "
                                                    "and the accuracy-vs-throughput PNG here.")] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
    precision: Annotated[RunPrecision | None, typer.Option(
        help="Run the torch and TorchScript rows at fp16/bf16 (the torch fp32 row stays the "
        "reference).")] = None,
) -> None:
    """Export one checkpoint to every format x precision it can, verify, evaluate and time each."""
    from export.benchmark import run_benchmark

    dataset = require_dataset(dataset, model)
    try:
        sizes = [int(v) for v in batch_sizes.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    result = run_benchmark(
        resolve_model(model), formats=_split_list(formats), precisions=_split_list(precisions),
        dataset=dataset.value, data_dir=data_dir, limit=limit, batch_sizes=sizes, device=device.value,
        output_dir=output_dir, allow_pickle=allow_pickle, progress=not as_json,
        runner_options=speed_options(precision), card_flags=card.flags() or None,
    )
    if as_json:
        print_json(result)
    else:
        from ..report import render_benchmark

        render_benchmark(result, console())
    if not any(row["status"] == "ok" for row in result["rows"]):
        raise typer.Exit(1)


@handles_errors
def info(model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """Print the card and the facts of any model file: format, precision, shapes, opset/TensorRT \
version, size."""  # one line in `toolkit --help` (rich mode keeps a docstring's line breaks)
    from ..describe import describe_artifact

    facts = describe_artifact(resolve_model(model))
    if as_json:
        print_json(facts)
        return
    from ..report import render_info

    render_info(facts, console())
