"""`toolkit predict`: class names and probabilities for image files, folders, globs or stdin paths."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .common import BatchOpt, ModelOpt, console, handles_errors, options, print_json, resolve_model
from .groups import CardOptions, EngineOptions, PredictFormat, RunnerOptions


@handles_errors
@options(card=CardOptions, run=RunnerOptions, engine=EngineOptions)
def predict_command(
    card: CardOptions,
    run: RunnerOptions,
    engine: EngineOptions,
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), globs, or - to read "
                                                "paths from stdin.", show_default=False)],
    model: ModelOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to list per "
                                       "image.")] = 5,
    fmt: Annotated[PredictFormat, typer.Option("--format", "-f", help="Output format.")] = (
        PredictFormat.table),
    batch_size: BatchOpt = 32,
    output_dir: Annotated[Path | None, typer.Option(help="Also write the predictions as shards: "
                                                    "DIR/predictions/part-NNNNN.parquet and a manifest "
                                                    "(--engine ray resumes from them).")] = None,
) -> None:
    """Classify images: class names and softmax probabilities. Exit 1 if any input could not be read."""
    from ..report import progress_bar

    items = engine.module.gather(inputs, sys.stdin if "-" in inputs else None)
    if not items:
        raise UsageError("no inputs: pass image files, folders, globs, or - with paths on stdin")
    spec = run.spec(resolve_model(model), card.flags(), batch_size)
    with progress_bar(len(items), f"predict {engine.label(spec)}") as advance:
        results = engine.module.predict(spec, items, top_k=top_k, batch_size=batch_size, progress=advance,
                                        output_dir=output_dir, **engine.run_options())
    if fmt is PredictFormat.json:
        print_json(results)
    elif fmt is PredictFormat.csv:
        from ..report import predictions_csv

        sys.stdout.write(predictions_csv(results))
    else:
        from ..report import render_predictions

        render_predictions(results, console())
    failed = sum("error" in r for r in results)
    if failed:
        console(stderr=True).print(f"[red]{failed} of {len(results)} inputs could not be read[/]")
        raise typer.Exit(1)
