"""`toolkit eval` and `toolkit compare`: metrics of any artifact on labelled images, alone or side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .common import (
    BatchOpt,
    DataDirOpt,
    DatasetOpt,
    JsonOpt,
    LimitOpt,
    ModelOpt,
    SplitOpt,
    console,
    handles_errors,
    options,
    print_json,
    require_dataset,
    resolve_model,
    say_sampling,
)
from .groups import CardOptions, EngineOptions, RunnerOptions

OutputDirOpt = Annotated[Path | None, typer.Option(
    help="Write metrics.json, predictions.csv, confusion_matrix.csv, plots and report.html here.")]


@handles_errors
@options(card=CardOptions, run=RunnerOptions, engine=EngineOptions)
def eval_command(
    card: CardOptions,
    run: RunnerOptions,
    engine: EngineOptions,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: SplitOpt = "test",
    download: Annotated[bool, typer.Option("--download", help="Fetch CIFAR into --data-dir if "
                                           "missing.")] = False,
    batch_size: BatchOpt = 256,
    limit: LimitOpt = None,
    output_dir: OutputDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy, top-5, per-class precision/recall/F1, confusion matrix and speed of any model artifact."""
    from ..engines.shards import SHARD_DIR
    from ..report import progress_bar, render_eval, write_eval_outputs

    dataset = require_dataset(dataset, model)
    path = resolve_model(model)
    data = engine.module.load_dataset(dataset.value, data_dir, split, download).subset(limit)
    say_sampling(data, quiet=as_json)
    spec = run.spec(path, card.flags(), batch_size)
    with progress_bar(len(data), f"eval {engine.label(spec)}", enabled=False if as_json else None) as advance:
        result = engine.module.evaluate(spec, data, batch_size=batch_size, progress=advance,
                                        output_dir=output_dir, **engine.run_options())
    report = result.report
    check = _precision_check(spec, report, batch_size, as_json)
    # --engine ray's predictions/ shards outlive the report's swap
    written = write_eval_outputs(report, output_dir, keep=(SHARD_DIR,)) if output_dir is not None else {}
    if as_json:
        print_json({**report.to_dict(), **({"precision_check": check} if check else {})})
    else:
        render_eval(report, console())
        if written:
            console().print(f"wrote {', '.join(p.name for p in written.values())} to {output_dir}")
    unreadable(result.errors, len(data))


def _precision_check(spec: Any, report: Any, batch_size: int, as_json: bool) -> dict[str, Any] | None:
    """fp16/bf16 eval: top-1 agreement with fp32 on a sample, as an export's verification reports it."""
    from ..evaluate import precision_agreement

    if spec.options.get("precision", "fp32") == "fp32" or report.data is None:
        return None
    fast = ("precision", "cuda_graphs", "compile", "compile_cache", "batch_size")
    reference = dataclasses.replace(spec, options={k: v for k, v in spec.options.items() if k not in fast})
    with reference.open() as runner:
        check = precision_agreement(runner, report, batch_size=batch_size)
    if not as_json:
        console(stderr=True).print(
            f"{report.precision} vs fp32 on {check['num_samples']} images: top-1 agreement "
            f"{check['top1_agreement']:.2%}, accuracy {check['reference_accuracy']:.2%} -> "
            f"{check['accuracy']:.2%}", style="dim")
    return check


def unreadable(errors: list[dict[str, str]], total: int) -> None:
    """Exit 1 after the outputs are written when some images could not be read (error rows)."""
    if errors:
        console(stderr=True).print(f"[red]{len(errors)} of {total} images could not be read "
                                   f"(first: {errors[0]['error']})[/]", highlight=False)
        raise typer.Exit(1)


@handles_errors
@options(card=CardOptions, run=RunnerOptions)
def compare_command(
    card: CardOptions,
    run: RunnerOptions,
    models: Annotated[list[str] | None, typer.Option(
        "--model", "-m", show_default=False,
        help="Exactly two: -m A -m B (any artifacts, e.g. an fp32 checkpoint and its int8 ONNX).")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: SplitOpt = "test",
    batch_size: BatchOpt = 256,
    limit: LimitOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Write comparison.json, disagreements.csv, "
                                                    "per_class_deltas.csv and report.html here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Two models on the same images: metrics side by side, disagreements, McNemar's test of the gap."""
    from ..compare import compare_reports
    from ..data import load_dataset
    from ..evaluate import evaluate
    from ..report import progress_bar, render_compare, write_compare_outputs

    if not models or len(models) != 2:
        raise UsageError(f"compare needs exactly two models (-m A -m B), got {len(models or [])}")
    if dataset is None:
        raise UsageError("--dataset is required: cifar10, cifar100, folder (with --data-dir) or sample")
    data = load_dataset(dataset.value, data_dir, split).subset(limit)
    say_sampling(data, quiet=as_json)
    flags = card.flags()
    reports = []
    for label, path in zip("AB", models):
        with run.spec(path, flags).open() as runner, \
                progress_bar(len(data), f"{label}: eval {runner.backend}",
                             enabled=False if as_json else None) as advance:
            reports.append(evaluate(runner, data, batch_size=batch_size, progress=advance))
    comparison = compare_reports(reports[0], reports[1])
    written = write_compare_outputs(comparison, output_dir) if output_dir is not None else {}
    if as_json:
        print_json(comparison.to_dict())
        return
    render_compare(comparison, console())
    if written:
        console().print(f"wrote {', '.join(p.name for p in written.values())} to {output_dir}")
