"""`toolkit`: the Typer app. Thin by design: parse, call the library, render, exit code.

Start-up imports only typer and the light parts of the toolkit; torch and the runtimes are
imported inside the commands that need them, so `toolkit --help` answers instantly.
"""

from __future__ import annotations

import functools
import json
import sys
import tomllib
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from . import __version__
from .errors import ToolkitError, UsageError

SAMPLE_MODEL = Path(__file__).parent / "sample" / "resnet20_digits.pt"

app = typer.Typer(
    name="toolkit",
    help="Validate, export, evaluate, predict and serve ResNet/ResNeXt image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

F = TypeVar("F", bound=Callable[..., Any])


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """One red line on stderr; the caller raises the returned Exit."""
    from rich.markup import escape

    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def handles_errors(func: F) -> F:
    """Turn ToolkitError into one red line and its exit code (usage errors 2), never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ToolkitError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _configured_model(folder: Path) -> str | None:
    """`[tool.toolkit] model` in ./pyproject.toml, or `model` in ./toolkit.toml."""
    for name, keys in (("pyproject.toml", ("tool", "toolkit", "model")), ("toolkit.toml", ("model",))):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value: Any = tomllib.loads(path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value:
            model = Path(str(value))
            return str(model if model.is_absolute() or str(value).startswith("http") else folder / model)
    return None


def resolve_model(model: str | None) -> str:
    """-m, else the project's configured model, else the bundled sample (with a one-line notice)."""
    if model:
        return model
    configured = _configured_model(Path.cwd())
    if configured:
        console(stderr=True).print(f"using model {configured} from project configuration", style="dim")
        return configured
    console(stderr=True).print(f"no -m given: using the bundled sample model {SAMPLE_MODEL.name}", style="dim")
    return str(SAMPLE_MODEL)


# --- shared option types ------------------------------------------------------------------------

class DatasetName(str, Enum):
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    folder = "folder"
    sample = "sample"


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint, TorchScript, ONNX, engine, "
                                                  "Triton model dir or http://host:port/model. Default: configured or sample.")]
ArchOpt = Annotated[str, typer.Option(help="Architecture name, or 'auto' to infer it from the tensors.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow checkpoints that carry pickled code "
                                              "(whole nn.Module). Only for files you trust.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DatasetOpt = Annotated[Optional[DatasetName], typer.Option(help="Dataset to measure on.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="Dataset folder (CIFAR root or class-per-subfolder images).")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Use only the first N images.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per inference batch.")]


def version_callback(value: bool) -> None:
    if value:
        print(f"toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Validate, export, evaluate, predict and serve ResNet/ResNeXt image classifiers."""


# --- validate --------------------------------------------------------------------------------------

@app.command()
@handles_errors
def validate(
    model: ModelOpt = None,
    arch: ArchOpt = "auto",
    classes: Annotated[Optional[str], typer.Option(help="cifar10, cifar100, imagenet, or a file of class names.")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="Dataset split for CIFAR: test or train.")] = "test",
    limit: LimitOpt = None,
    min_accuracy: Annotated[Optional[float], typer.Option(min=0, help="Fail below this top-1 accuracy "
                                                          "(0-1, or a percentage above 1).")] = None,
    batch_size: BatchOpt = 128,
    allow_pickle: AllowPickleOpt = False,
    write_card: Annotated[bool, typer.Option("--write-card", help="Write CKPT.card.json beside the checkpoint.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check that weights are a healthy ResNet/ResNeXt: architecture, head, load, numerics, accuracy."""
    from .card import sidecar_path
    from .validate import validate_checkpoint

    path = resolve_model(model)
    if min_accuracy is not None and min_accuracy > 1:
        min_accuracy /= 100.0
    if min_accuracy is not None and dataset is None:
        raise UsageError("--min-accuracy needs --dataset (and --data-dir for cifar10/cifar100/folder)")
    report = validate_checkpoint(
        path, arch=arch, classes=classes, dataset=dataset.value if dataset else None, data_dir=data_dir,
        split=split, limit=limit, min_accuracy=min_accuracy, allow_pickle=allow_pickle, batch_size=batch_size,
    )
    if write_card and report.card is not None:
        report.card.save(sidecar_path(path))
    if as_json:
        print_json(report.to_dict())
    else:
        from .report import render_validation

        render_validation(report, console())
        if write_card and report.card is not None:
            console().print(f"wrote {sidecar_path(path)}")
    if not report.valid:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
