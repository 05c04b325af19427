"""What every command module shares: the console, one-line errors, the model default, option groups.

Option groups (`options`) declare a set of flags once, as a frozen dataclass of `Annotated` fields,
for every command that takes them: the card flags, how a model is opened and run, where batch work
runs. Typer has no parameter groups of its own, so `options` writes the group's fields into the
command's signature and hands the command one group object per name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast, get_type_hints

import typer

from ..errors import ToolkitError, UsageError
from ..names import DATASETS
from ..sample import SAMPLE_MODEL

F = TypeVar("F", bound=Callable[..., Any])


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """One red line on stderr; the caller raises the returned Exit."""
    from rich.markup import escape

    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def note(message: str) -> None:
    """One dim line on stderr: what the command decided for the user (a default, a subset)."""
    console(stderr=True).print(message, style="dim")


class _NoticeHandler(logging.Handler):
    """The library's notices (`toolkit.notice`: a flag overriding an artifact's card...) as dim lines
    on whatever stderr is now (CliRunner swaps it per call)."""

    def emit(self, record: logging.LogRecord) -> None:
        note(record.getMessage())


def show_notices() -> None:
    """Route `toolkit.notice` to the terminal, once, whatever logging the process has set up."""
    notices = logging.getLogger("toolkit.notice")
    if not any(isinstance(h, _NoticeHandler) for h in notices.handlers):
        notices.addHandler(_NoticeHandler())
        notices.propagate = False


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


def value(choice: Any) -> str:
    """An Enum choice's value (Typer passes members; a default given as its value stays a str)."""
    return str(getattr(choice, "value", choice))


def given(**options: Any) -> dict[str, Any]:
    """The options the user set (None: not given), for callees that refuse those they do not take."""
    return {key: option for key, option in options.items() if option is not None}


# --- the model: -m, the project's configuration, or the sample --------------------------------------

def _configured_model(folder: Path) -> str | None:
    """`[tool.toolkit] model` in ./pyproject.toml, or `model` in ./toolkit.toml."""
    for name, keys in (("pyproject.toml", ("tool", "toolkit", "model")), ("toolkit.toml", ("model",))):
        path = folder / name
        if not path.is_file():
            continue
        try:
            found: Any = tomllib.loads(path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None
        for key in keys:
            found = found.get(key) if isinstance(found, dict) else None
        if found:
            model = Path(str(found))
            return str(model if model.is_absolute() or str(found).startswith("http") else folder / model)
    return None


def resolve_model(model: str | None) -> str:
    """-m, else the project's configured model, else the bundled sample (with a one-line notice)."""
    if model:
        return model
    configured = _configured_model(Path.cwd())
    if configured:
        note(f"using model {configured} from project configuration")
        return configured
    note(f"no -m given: using the bundled sample model {SAMPLE_MODEL.name}")
    return str(SAMPLE_MODEL)


# --- choices from the registries --------------------------------------------------------------------

class Choice(str, Enum):
    """Base of the choice Enums whose members come from a registry's name list (`choices`).

    mypy cannot see members made at run time, so each such Enum is declared to it, under
    TYPE_CHECKING, as a memberless subclass of this: look members up by name, which is their value
    (`DatasetName["sample"]`), not as attributes.
    """


def choices(name: str, values: Iterable[str]) -> type[Choice]:
    """A `str` Enum for Typer's choices, built from one of the registries' name lists."""
    # Enum's functional API; typeshed resolves a call on a str-mixin Enum to str(), hence the ignore.
    members = Choice(name, [(item, item) for item in values])  # type: ignore[call-overload]
    return cast(type[Choice], members)


if TYPE_CHECKING:
    class DatasetName(Choice): ...
else:
    DatasetName = choices("DatasetName", DATASETS)


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m",
    help="Checkpoint (file, or a timm/transformers folder), TorchScript, ONNX, engine, Triton model dir or "
    "http://host:port/model. Default: configured or sample.")]
ArchOpt = Annotated[str, typer.Option(help="Architecture name, or 'auto' to infer it from the tensors.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle",
    help="Allow checkpoints that carry pickled code (whole nn.Module). Only for files you trust.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DatasetOpt = Annotated[DatasetName | None, typer.Option(help="Dataset to measure on.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Dataset folder (CIFAR root or class-per-subfolder "
                                                 "images).")]
SplitOpt = Annotated[str, typer.Option(help="Dataset split for CIFAR: test or train.")]
LimitOpt = Annotated[int | None, typer.Option(
    min=1, help="Use N images: a seeded, class-balanced subset of a labelled dataset.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per inference batch.")]
DeviceOpt = Annotated[DeviceName, typer.Option(help="Where to run the model.")]


def require_dataset(dataset: Any, model: str | None) -> Any:
    """eval/benchmark: --dataset is required with -m; without -m the sample model meets the sample data."""
    if dataset is not None:
        return dataset
    if model:
        raise UsageError("--dataset is required with -m: cifar10, cifar100, folder (with --data-dir) "
                         "or sample")
    return DatasetName["sample"]


def say_sampling(data: Any, quiet: bool = False) -> None:
    """One line when --limit took a subset, saying how (class-balanced, seeded), as the issue asks."""
    sampling = getattr(data, "sampling", None)
    if sampling and not quiet:
        note(f"--limit: {sampling}")


# --- option groups ------------------------------------------------------------------------------

def options(**groups: type) -> Callable[[F], F]:
    """Declare option groups once: `@options(card=CardOptions)` adds CardOptions' fields to the command's
    flags and calls the command with `card=CardOptions(...)` built from them.

    Each group is a dataclass whose fields are `Annotated[type, typer.Option(...)]` with defaults; field
    names must not clash with the command's own parameters or another group's.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        hints = get_type_hints(func, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name not in groups]
        added: dict[str, list[str]] = {}
        for group_name, group in groups.items():
            group_hints = get_type_hints(group, include_extras=True)
            fields = dataclasses.fields(group)
            added[group_name] = [f.name for f in fields]
            own += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                      annotation=group_hints[f.name]) for f in fields]
        clash = {p.name for p in own if [q.name for q in own].count(p.name) > 1}
        if clash:
            raise TypeError(f"{func.__name__}: option names used twice: {', '.join(sorted(clash))}")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for group_name, names in added.items():
                kwargs[group_name] = groups[group_name](**{n: kwargs.pop(n) for n in names if n in kwargs})
            return func(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=_ordered(own))  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own}
        return wrapper  # type: ignore[return-value]

    return decorate


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Positional parameters (arguments) first, then keyword-only: a valid signature in Typer's order."""
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    return positional + [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
