"""`toolkit`: the Typer app. Thin by design: parse, call the library, render, exit code.

One module per command group (validate, evaluate: eval + compare, predict, export: export + benchmark
+ info, serve); the options several commands share are declared once, in `groups`. Start-up imports
only typer and the light parts of the toolkit; torch and the runtimes are imported inside the
commands that need them, so `toolkit --help` answers instantly. This package is the only place that
imports `export/` and `serve/`, inside the commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from .common import DatasetName, DeviceName, choices, show_notices
from .evaluate import compare_command, eval_command
from .export import CalibMethod, ExportFormat, Precision, benchmark_command, export, info
from .groups import BackendName, RunPrecision
from .predict import predict_command
from .serve import serve_command
from .validate import validate

__all__ = ["BackendName", "CalibMethod", "DatasetName", "DeviceName", "ExportFormat", "Precision",
           "RunPrecision", "app", "choices", "main"]

app = typer.Typer(
    name="toolkit",
    help="Validate, export, evaluate, predict and serve ResNet/ResNeXt image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def version_callback(asked: bool) -> None:
    if asked:
        print(f"toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Validate, export, evaluate, predict and serve ResNet/ResNeXt image classifiers."""
    show_notices()


app.command()(validate)
app.command("eval")(eval_command)
app.command("predict")(predict_command)
app.command("benchmark")(benchmark_command)
app.command("compare")(compare_command)
app.command("serve")(serve_command)
app.command()(export)
app.command()(info)


def main() -> None:
    """Console-script entry point."""
    app()
