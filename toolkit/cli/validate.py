"""`toolkit validate`: is this checkpoint a healthy ResNet/ResNeXt, and what is its card?"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from .common import (
    AllowPickleOpt,
    ArchOpt,
    BatchOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceName,
    JsonOpt,
    LimitOpt,
    ModelOpt,
    SplitOpt,
    console,
    handles_errors,
    options,
    print_json,
    resolve_model,
)
from .groups import CardOptions, RunPrecision, speed_options


@handles_errors
@options(card=CardOptions)
def validate(
    card: CardOptions,
    model: ModelOpt = None,
    arch: ArchOpt = "auto",
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: SplitOpt = "test",
    limit: LimitOpt = None,
    min_accuracy: Annotated[float | None, typer.Option(min=0, help="Fail below this top-1 accuracy "
                                                       "(0-1, or a percentage above 1).")] = None,
    batch_size: BatchOpt = 128,
    allow_pickle: AllowPickleOpt = False,
    write_card: Annotated[bool, typer.Option("--write-card", help="Write the merged card as CKPT.card.json "
                                             "beside the checkpoint.")] = False,
    as_json: JsonOpt = False,
    device: Annotated[DeviceName, typer.Option(help="Where the accuracy measurement (--dataset) "
                                               "runs.")] = DeviceName.cpu,
    precision: Annotated[RunPrecision | None, typer.Option(
        help="Compute precision of the accuracy measurement (fp32, fp16, bf16).")] = None,
) -> None:
    """Check that weights are a healthy ResNet/ResNeXt: architecture, head, load, numerics, accuracy."""
    from ..card import sidecar_path
    from ..runtime.registry import require_checkpoint
    from ..validate import validate_checkpoint

    path = require_checkpoint(resolve_model(model), doing="validate")
    if min_accuracy is not None and min_accuracy > 1:
        min_accuracy /= 100.0
    if min_accuracy is not None and dataset is None:
        raise UsageError("--min-accuracy needs --dataset (and --data-dir for cifar10/cifar100/folder)")
    if (precision is not None or device is not DeviceName.cpu) and dataset is None:
        raise UsageError("--device and --precision set how the accuracy measurement runs: they need "
                         "--dataset (and --min-accuracy for a gate)")
    report = validate_checkpoint(
        path, arch=arch, flags=card.flags(), dataset=dataset.value if dataset else None, data_dir=data_dir,
        split=split, limit=limit, min_accuracy=min_accuracy, allow_pickle=allow_pickle, batch_size=batch_size,
        device=device.value, **speed_options(precision),
    )
    written = report.card.save(sidecar_path(path)) if write_card and report.card is not None else None
    if as_json:
        print_json(report.to_dict())
    else:
        from ..report import render_validation

        render_validation(report, console())
        if written is not None:
            console().print(f"wrote {written}")
    if not report.valid:
        raise typer.Exit(1)

