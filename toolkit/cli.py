"""`toolkit`: the Typer app. Thin by design: parse, call the library, render, exit code.

Start-up imports only typer and the light parts of the toolkit; torch and the runtimes are
imported inside the commands that need them, so `toolkit --help` answers instantly.
"""

from __future__ import annotations

import functools
import json
import sys
import tomllib
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer

from . import __version__
from .engines import DEFAULT_ENGINE, ENGINES
from .errors import ToolkitError, UsageError
from .names import CALIB_METHODS, COMPILE_MODES, DATASETS, EXPORT_FORMATS, EXPORT_PRECISIONS, RUN_PRECISIONS
from .runtime.registry import BACKENDS

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
    console(stderr=True).print(f"no -m given: using the bundled sample model {SAMPLE_MODEL.name}",
                               style="dim")
    return str(SAMPLE_MODEL)


# --- shared option types ------------------------------------------------------------------------

class Choice(str, Enum):
    """Base of the choice Enums whose members come from a registry's name list (`_choices`).

    mypy cannot see members made at run time, so each such Enum is declared to it, under
    TYPE_CHECKING, as a memberless subclass of this: look members up by name, which is their value
    (`DatasetName["sample"]`), not as attributes.
    """


def _choices(name: str, values: Iterable[str]) -> type[Choice]:
    """A `str` Enum for Typer's choices, built from one of the registries' name lists."""
    # Enum's functional API; typeshed resolves a call on a str-mixin Enum to str(), hence the ignore.
    members = Choice(name, [(value, value) for value in values])  # type: ignore[call-overload]
    return cast(type[Choice], members)


if TYPE_CHECKING:
    class DatasetName(Choice): ...
else:
    DatasetName = _choices("DatasetName", DATASETS)


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m",
    help="Checkpoint, TorchScript, ONNX, engine, Triton model dir or http://host:port/model. "
    "Default: configured or sample.")]
ArchOpt = Annotated[str, typer.Option(help="Architecture name, or 'auto' to infer it from the tensors.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle",
    help="Allow checkpoints that carry pickled code (whole nn.Module). Only for files you trust.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DatasetOpt = Annotated[DatasetName | None, typer.Option(help="Dataset to measure on.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Dataset folder (CIFAR root or class-per-subfolder "
                                                 "images).")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Use only the first N images.")]
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
    classes: Annotated[str | None, typer.Option(help="cifar10, cifar100, imagenet, or a file of class "
                                                "names.")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="Dataset split for CIFAR: test or train.")] = "test",
    limit: LimitOpt = None,
    min_accuracy: Annotated[float | None, typer.Option(min=0, help="Fail below this top-1 accuracy "
                                                       "(0-1, or a percentage above 1).")] = None,
    batch_size: BatchOpt = 128,
    allow_pickle: AllowPickleOpt = False,
    write_card: Annotated[bool, typer.Option("--write-card", help="Write CKPT.card.json beside the "
                                             "checkpoint.")] = False,
    as_json: JsonOpt = False,
    device: Annotated[DeviceName, typer.Option(help="Where the accuracy measurement (--dataset) "
                                               "runs.")] = DeviceName.cpu,
    precision: PrecisionOpt = None,
) -> None:
    """Check that weights are a healthy ResNet/ResNeXt: architecture, head, load, numerics, accuracy."""
    from .card import sidecar_path
    from .runtime.registry import detect_format
    from .validate import validate_checkpoint

    path = resolve_model(model)
    if detect_format(path) != "checkpoint":
        raise UsageError(f"validate checks training checkpoints (.pt .pth .ckpt .safetensors); {path} is an "
                         "exported artifact: use `toolkit info` or `toolkit eval` on it")
    if min_accuracy is not None and min_accuracy > 1:
        min_accuracy /= 100.0
    if min_accuracy is not None and dataset is None:
        raise UsageError("--min-accuracy needs --dataset (and --data-dir for cifar10/cifar100/folder)")
    if (precision is not None or device is not DeviceName.cpu) and dataset is None:
        raise UsageError("--device and --precision set how the accuracy measurement runs: they need "
                         "--dataset (and --min-accuracy for a gate)")
    report = validate_checkpoint(
        path, arch=arch, classes=classes, dataset=dataset.value if dataset else None, data_dir=data_dir,
        split=split, limit=limit, min_accuracy=min_accuracy, allow_pickle=allow_pickle, batch_size=batch_size,
        device=device.value, **_gpu_options(precision),
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


# --- eval / predict / benchmark (issue 4) ---------------------------------------------------------

# --backend: "auto" and every backend of the registry (toolkit/runtime/registry.py BACKENDS)
if TYPE_CHECKING:
    class BackendName(Choice): ...
else:
    BackendName = _choices("BackendName", ("auto", *BACKENDS))


class PredictFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


BackendOpt = Annotated[BackendName, typer.Option(help="Runtime; auto picks the artifact's default.")]
DeviceOpt = Annotated[DeviceName, typer.Option(help="Where to run the model.")]


def _runner_spec(model: str, backend: Any, device: DeviceName, allow_pickle: bool,
                 extra: dict[str, Any] | None = None) -> Any:
    """What to open (engines open it where the work runs: here, or in each Ray replica)."""
    from .engines import RunnerSpec
    from .runtime.registry import detect_format

    options = dict(extra or {})
    if allow_pickle:
        if detect_format(model) != "checkpoint":
            raise UsageError("--allow-pickle applies to checkpoints only (other formats hold no pickles)")
        options["allow_pickle"] = True
    return RunnerSpec(model, backend.value, device.value, options)


def _open_runner(model: str, backend: Any, device: DeviceName, allow_pickle: bool,
                 extra: dict[str, Any] | None = None) -> Any:
    return _runner_spec(model, backend, device, allow_pickle, extra).open()


# --- GPU speed options (issue 12): typed options of the torch/torchscript/onnxruntime runners -------
if TYPE_CHECKING:
    class RunPrecision(Choice): ...
    class CompileMode(Choice): ...
else:
    RunPrecision = _choices("RunPrecision", RUN_PRECISIONS)
    CompileMode = _choices("CompileMode", COMPILE_MODES)
PrecisionOpt = Annotated[RunPrecision | None, typer.Option(
    help="torch/torchscript: compute in fp32, fp16 or bf16 (weights cast once; eval checks fp16/bf16 "
    "against fp32 on a sample). Default: fp32.")]
CudaGraphsOpt = Annotated[bool, typer.Option("--cuda-graphs", help="torch/torchscript on cuda: capture a "
                                             "CUDA graph per batch shape (the last batch padded).")]
CompileOpt = Annotated[CompileMode | None, typer.Option(
    "--compile", help="torch: torch.compile the model (fixed batch shapes; eager if it cannot compile).")]
CompileCacheOpt = Annotated[Path | None, typer.Option(
    help="--compile: inductor's cache folder, reused by later runs. Default: "
    "~/.cache/resnet-toolkit/inductor.")]
TrtOpt = Annotated[bool, typer.Option("--trt", help="onnxruntime on cuda: ONNX Runtime's TensorRT execution "
                                      "provider (engines cached in --trt-cache).")]
TrtCacheOpt = Annotated[Path | None, typer.Option(help="--trt: engine cache folder. Default: "
                                                  "~/.cache/resnet-toolkit/ort-trt.")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Threads that decode image files. Default: every "
                                                "core.")]


def _gpu_options(precision: Any = None, cuda_graphs: bool = False, compile: Any = None,
                 compile_cache: Path | None = None, trt: bool = False, trt_cache: Path | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
    """The runner options the user set (only those, so other backends are not offered them)."""
    options: dict[str, Any] = {}
    if precision is not None:
        options["precision"] = _value(precision)
    if cuda_graphs:
        options["cuda_graphs"] = True
    if compile is not None:
        options["compile"] = _value(compile)
        if compile_cache is not None:
            options["compile_cache"] = str(compile_cache)
    elif compile_cache is not None:
        raise UsageError("--compile-cache applies with --compile")
    if (cuda_graphs or compile is not None) and batch_size:
        options["batch_size"] = batch_size  # the fixed shape, warmed up and captured at load
    if trt:
        options["use_tensorrt"] = True
        if trt_cache is not None:
            options["trt_cache"] = str(trt_cache)
    elif trt_cache is not None:
        raise UsageError("--trt-cache applies with --trt")
    return options


def _precision_check(spec: Any, report: Any, batch_size: int, as_json: bool) -> dict[str, Any] | None:
    """fp16/bf16 eval: top-1 agreement with fp32 on a sample, as an export's verification reports it."""
    import dataclasses

    from .evaluate import precision_agreement

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


# --engine and its options (issue 13): toolkit/engines/ is the registry of engine names
if TYPE_CHECKING:
    class EngineName(Choice): ...
else:
    EngineName = _choices("EngineName", ENGINES)
EngineOpt = Annotated[EngineName, typer.Option(help="Where the work runs: local (this process) or ray (Ray "
                                               "Data on a local or existing Ray cluster; resumable).")]
AddressOpt = Annotated[str | None, typer.Option(help="--engine ray: the cluster to join, 'auto' (RAY_ADDRESS "
                                                "or the running one) or ray://host:10001. Default: start one "
                                                "here.")]
ReplicasOpt = Annotated[int | None, typer.Option(min=1, help="--engine ray: model replicas (actors). "
                                                 "Default: one per GPU with --device cuda, else one per 4 "
                                                 "CPUs.")]
ShardSizeOpt = Annotated[int | None, typer.Option(min=1, help="--engine ray: rows per output shard "
                                                  "(predictions/part-NNNNN.parquet). Default: 1000.")]


def _engine_options(address: str | None, replicas: int | None, shard_size: int | None) -> dict[str, Any]:
    given = {"address": address, "replicas": replicas, "shard_size": shard_size}
    return {name: value for name, value in given.items() if value is not None}


def _engine_label(spec: Any, engine: Any) -> str:
    """What the progress bar names: the backend, and the engine when it is not the local one."""
    return spec.backend_name() + ("" if engine.value == DEFAULT_ENGINE else f" on {engine.value}")


def _local_options(workers: int | None, engine: Any) -> dict[str, Any]:
    """`--workers` (decode threads) belongs to the local engine; Ray Data decodes in its own tasks."""
    if workers is None:
        return {}
    if engine.value != DEFAULT_ENGINE:
        raise UsageError("--workers applies to --engine local (Ray Data decodes in its own tasks)")
    return {"workers": workers}


def _unreadable(errors: list[dict[str, str]], total: int) -> None:
    """Exit 1 after the outputs are written when some images could not be read (error rows)."""
    if errors:
        console(stderr=True).print(f"[red]{len(errors)} of {total} images could not be read "
                                   f"(first: {errors[0]['error']})[/]", highlight=False)
        raise typer.Exit(1)


@app.command("eval")
@handles_errors
def eval_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="Dataset split for CIFAR: test or train.")] = "test",
    download: Annotated[bool, typer.Option("--download", help="Fetch CIFAR into --data-dir if "
                                           "missing.")] = False,
    backend: BackendOpt = BackendName["auto"],
    device: DeviceOpt = DeviceName.cpu,
    batch_size: BatchOpt = 256,
    limit: LimitOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Write metrics.json, predictions.csv, "
                                                    "confusion_matrix.csv, plots and report.html "
                                                    "here.")] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
    engine: EngineOpt = EngineName[DEFAULT_ENGINE],
    address: AddressOpt = None,
    replicas: ReplicasOpt = None,
    shard_size: ShardSizeOpt = None,
    precision: PrecisionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    compile: CompileOpt = None,
    compile_cache: CompileCacheOpt = None,
    trt: TrtOpt = False,
    trt_cache: TrtCacheOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Accuracy, top-5, per-class precision/recall/F1, confusion matrix and speed of any model artifact."""
    from .engines import get_engine
    from .report import progress_bar, render_eval, write_eval_outputs

    if dataset is None:
        if model:
            raise UsageError("--dataset is required with -m: cifar10, cifar100, folder (with --data-dir) "
                             "or sample")
        dataset = DatasetName["sample"]
    path = resolve_model(model)
    run = get_engine(engine.value)
    data = run.load_dataset(dataset.value, data_dir, split, download).subset(limit)
    spec = _runner_spec(path, backend, device, allow_pickle,
                        _gpu_options(precision, cuda_graphs, compile, compile_cache, trt, trt_cache,
                                     batch_size))
    local = _local_options(workers, engine)
    with progress_bar(len(data), f"eval {_engine_label(spec, engine)}",
                      enabled=False if as_json else None) as advance:
        result = run.evaluate(spec, data, batch_size=batch_size, progress=advance, output_dir=output_dir,
                              **_engine_options(address, replicas, shard_size), **local)
    report = result.report
    check = _precision_check(spec, report, batch_size, as_json)
    written = {}
    if output_dir is not None:
        from .engines.shards import SHARD_DIR

        # --engine ray's predictions/ shards outlive the report's swap
        written = write_eval_outputs(report, output_dir, keep=(SHARD_DIR,))
    if as_json:
        print_json({**report.to_dict(), **({"precision_check": check} if check else {})})
        return _unreadable(result.errors, len(data))

    render_eval(report, console())
    if written:
        console().print(f"wrote {', '.join(p.name for p in written.values())} to {output_dir}")
    _unreadable(result.errors, len(data))


@app.command("predict")
@handles_errors
def predict_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), globs, or - to read "
                                                "paths from stdin.", show_default=False)],
    model: ModelOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to list per "
                                       "image.")] = 5,
    fmt: Annotated[PredictFormat, typer.Option("--format", "-f", help="Output format.")] = (
        PredictFormat.table),
    backend: BackendOpt = BackendName["auto"],
    device: DeviceOpt = DeviceName.cpu,
    batch_size: BatchOpt = 32,
    allow_pickle: AllowPickleOpt = False,
    output_dir: Annotated[Path | None, typer.Option(help="Also write the predictions as shards: "
                                                    "DIR/predictions/part-NNNNN.parquet and a manifest "
                                                    "(--engine ray resumes from them).")] = None,
    engine: EngineOpt = EngineName[DEFAULT_ENGINE],
    address: AddressOpt = None,
    replicas: ReplicasOpt = None,
    shard_size: ShardSizeOpt = None,
    precision: PrecisionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    compile: CompileOpt = None,
    compile_cache: CompileCacheOpt = None,
    trt: TrtOpt = False,
    trt_cache: TrtCacheOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Classify images: class names and softmax probabilities. Exit 1 if any input could not be read."""
    from .engines import get_engine
    from .report import progress_bar

    run = get_engine(engine.value)
    items = run.gather(inputs, sys.stdin if "-" in inputs else None)
    if not items:
        raise UsageError("no inputs: pass image files, folders, globs, or - with paths on stdin")
    spec = _runner_spec(resolve_model(model), backend, device, allow_pickle,
                        _gpu_options(precision, cuda_graphs, compile, compile_cache, trt, trt_cache,
                                     batch_size))
    local = _local_options(workers, engine)
    with progress_bar(len(items), f"predict {_engine_label(spec, engine)}") as advance:
        results = run.predict(spec, items, top_k=top_k, batch_size=batch_size, progress=advance,
                              output_dir=output_dir, **_engine_options(address, replicas, shard_size),
                              **local)
    if fmt is PredictFormat.json:
        print_json(results)
    elif fmt is PredictFormat.csv:
        from .report import predictions_csv

        sys.stdout.write(predictions_csv(results))
    else:
        from .report import render_predictions

        render_predictions(results, console())
    failed = sum("error" in r for r in results)
    if failed:
        console(stderr=True).print(f"[red]{failed} of {len(results)} inputs could not be read[/]")
        raise typer.Exit(1)


@app.command("benchmark")
@handles_errors
def benchmark_command(
    model: ModelOpt = None,
    formats: Annotated[list[str] | None, typer.Option("--formats", help="Formats to try (repeat or comma-"
                       "separate): torch, torchscript, onnx, openvino, tensorrt. Default: all.")] = None,
    precisions: Annotated[list[str] | None, typer.Option("--precisions", help="Precisions of the exported "
                          "files: fp32, fp16, int8 (repeat or comma-separate). Default: all.")] = None,
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
    precision: PrecisionOpt = None,
) -> None:
    """Export one checkpoint to every format x precision it can, verify, evaluate and time each.

    --precision runs the torch and TorchScript rows at fp16/bf16, against the torch fp32 reference row."""
    from export.benchmark import run_benchmark

    def split_list(values: list[str] | None) -> list[str] | None:
        return [v.strip() for value in values for v in value.split(",") if v.strip()] if values else None

    if dataset is None:
        if model:
            raise UsageError("--dataset is required with -m: cifar10, cifar100, folder (with --data-dir) "
                             "or sample")
        dataset = DatasetName["sample"]
    try:
        sizes = [int(v) for v in batch_sizes.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    result = run_benchmark(
        resolve_model(model), formats=split_list(formats), precisions=split_list(precisions),
        dataset=dataset.value, data_dir=data_dir, limit=limit, batch_sizes=sizes, device=device.value,
        output_dir=output_dir, allow_pickle=allow_pickle, progress=not as_json,
        runner_options=_gpu_options(precision),
    )
    if as_json:
        print_json(result)
    else:
        from .report import render_benchmark

        render_benchmark(result, console())
    if not any(row["status"] == "ok" for row in result["rows"]):
        raise typer.Exit(1)


# --- compare (issue 14) ----------------------------------------------------------------------------

@app.command("compare")
@handles_errors
def compare_command(
    models: Annotated[list[str] | None, typer.Option(
        "--model", "-m", show_default=False,
        help="Exactly two: -m A -m B (any artifacts, e.g. an fp32 checkpoint and its int8 ONNX).")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="Dataset split for CIFAR: test or train.")] = "test",
    backend: BackendOpt = BackendName["auto"],
    device: DeviceOpt = DeviceName.cpu,
    batch_size: BatchOpt = 256,
    limit: LimitOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Write comparison.json, disagreements.csv, "
                                                    "per_class_deltas.csv and report.html here.")] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Two models on the same images: metrics side by side, disagreements, McNemar's test of the gap."""
    from .compare import compare_reports
    from .data import load_dataset
    from .evaluate import evaluate
    from .report import progress_bar, render_compare, write_compare_outputs

    if not models or len(models) != 2:
        raise UsageError(f"compare needs exactly two models (-m A -m B), got {len(models or [])}")
    if dataset is None:
        raise UsageError("--dataset is required: cifar10, cifar100, folder (with --data-dir) or sample")
    data = load_dataset(dataset.value, data_dir, split).subset(limit)
    reports = []
    for label, path in zip("AB", models):
        with _open_runner(path, backend, device, allow_pickle) as runner, \
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


# --- serve (issue 5) -------------------------------------------------------------------------------

@app.command("serve")
@handles_errors
def serve_command(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(
        help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    name: Annotated[str | None, typer.Option(help="Model name on the wire. Default: the file stem.")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most images per runner call.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(
        min=0, help="Hold a batch open this long for more requests "
        "(0: batch whatever queued while the model was busy).")] = 0.0,
    max_queue: Annotated[int, typer.Option(
        min=1, help="Requests waiting beyond this get 503 + Retry-After.")] = 256,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="A request waiting longer gets 504.")] = 30.0,
    max_body_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest request body; larger gets 413.")] = 16.0,
    max_pixels: Annotated[int, typer.Option(
        min=1, help="Largest image (width x height); larger gets 413.")] = 50_000_000,
    api_key: Annotated[str | None, typer.Option(
        envvar="TOOLKIT_API_KEY",
        help="Require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (health endpoints stay open).")] = None,
    backend: BackendOpt = BackendName["auto"],
    device: DeviceOpt = DeviceName.cpu,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Front-end processes sharing the port (HTTP, decoding); 1: everything in this process. "
        "Default: one per core, at most 8.")] = None,
    decode_threads: Annotated[int, typer.Option(
        min=1, help="Threads per front-end process that decode and preprocess images.")] = 2,
    runner_per_worker: Annotated[bool | None, typer.Option(
        "--runner-per-worker/--shared-runner", help="With --workers > 1: a model in every worker, each "
        "batching its own requests, or one inference process whose one batcher all workers feed. "
        "Default: per worker for ONNX Runtime on CPU (faster there), otherwise shared (GPUs: the "
        "biggest batches).", show_default=False)] = None,
    model_instances: Annotated[int | None, typer.Option(
        min=1, help="With --shared-runner: copies of the model behind the one batcher. Default: ONNX "
        "Runtime on CPU one per worker (each with cores/N threads), otherwise 1.")] = None,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections; more get 503.")] = 512,
    read_timeout_s: Annotated[float, typer.Option(min=0.1, help="Headers must arrive within this, and the "
                                                  "body within 3x this; slower gets 408.")] = 10.0,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="v2 gRPC port (Triton's "
                                                  "GRPCInferenceService; 0: none). Default: 8001.")] = None,
    reject_nonfinite: Annotated[bool, typer.Option(help="Answer 400 to v2 inputs holding NaN/Inf (Triton "
                                                   "accepts them).")] = False,
    allow_pickle: AllowPickleOpt = False,
    precision: PrecisionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    trt: TrtOpt = False,
    trt_cache: TrtCacheOpt = None,
) -> None:
    """Serve MODEL over HTTP: /predict, /evaluate, Open Inference Protocol v2 (KServe/Triton), \
/metrics, a page."""  # one line in `toolkit --help` (rich mode keeps a docstring's line breaks)
    from serve.config import ServeConfig
    from serve.server import serve
    from serve.workers import default_workers, serve_workers

    path = resolve_model(model)
    wire_name = name or (path.rstrip("/").rsplit("/", 1)[-1] if path.startswith("http") else Path(path).stem)
    grpc = _grpc_port(grpc_port)
    processes = workers or default_workers()
    spec = _runner_spec(path, backend, device, allow_pickle,
                        _gpu_options(precision, cuda_graphs, trt=trt, trt_cache=trt_cache,
                                     batch_size=max_batch_size))
    config = ServeConfig(name=wire_name, host=host, port=port, max_batch_size=max_batch_size,
                         max_delay_ms=max_delay_ms, max_queue=max_queue, timeout_s=timeout_s,
                         max_body_mb=max_body_mb, max_pixels=max_pixels, api_key=api_key or None,
                         decode_workers=decode_threads, workers=processes, max_connections=max_connections,
                         header_timeout_s=read_timeout_s, body_timeout_s=3 * read_timeout_s,
                         grpc_port=grpc, reject_nonfinite=reject_nonfinite)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console(stderr=True).print(f"[yellow]warning:[/] serving on {host} without --api-key",
                                   highlight=False)
    where = f"on http://{host}:{port}/  v2: /v2/models/{wire_name}"
    where += (f"  gRPC: {host}:{grpc}" if grpc else "") + (f"  ({processes} workers)" * (processes > 1))
    if processes > 1:  # the model opens in the inference process
        console(stderr=True).print(f"serving {wire_name} ({spec.backend_name()}) {where}", style="dim")
        if runner_per_worker and device.value != "cpu":
            raise UsageError("--runner-per-worker is for CPUs; a GPU is shared through one inference process")
        if runner_per_worker and model_instances is not None:
            raise UsageError("--model-instances applies to --shared-runner (with --runner-per-worker every "
                             "worker has one model)")
        serve_workers(spec, config, processes, runner_per_worker=runner_per_worker,
                      instances=model_instances)
        return
    runner = spec.open()
    console(stderr=True).print(f"serving {wire_name} ({runner.backend}) {where}", style="dim")
    with runner:
        serve(runner, config)


def _grpc_port(asked: int | None) -> int:
    """--grpc-port, or Triton's 8001 when gRPC's packages are installed (else a one-line warning)."""
    import importlib

    port = 8001 if asked is None else asked
    if port:
        try:
            importlib.import_module("serve.grpc")
        except ImportError as exc:
            if asked is not None:
                raise UsageError(f"--grpc-port {asked}: {exc}") from None
            from rich.markup import escape

            console(stderr=True).print(f"[yellow]warning:[/] no gRPC endpoint: {escape(str(exc))}",
                                       highlight=False)
            return 0
    return port


# --- export and info ------------------------------------------------------------------------------

# Choices come from toolkit/names.py, the one list the export pipeline is keyed by.
if TYPE_CHECKING:
    class ExportFormat(Choice): ...
    class Precision(Choice): ...
    class CalibMethod(Choice): ...
else:
    ExportFormat = _choices("ExportFormat", EXPORT_FORMATS)
    Precision = _choices("Precision", EXPORT_PRECISIONS)
    CalibMethod = _choices("CalibMethod", CALIB_METHODS)


@app.command()
@handles_errors
def export(
    model: ModelOpt = None,
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help="Artifact to write.")] = ExportFormat["onnx"],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Destination file, or an existing folder to write <stem>.<ext> in "
        "(for triton: the model repository). Default: beside the checkpoint (model.pt -> model.onnx, "
        "model.int8.onnx, model.ts).")] = None,
    precision: Annotated[Precision, typer.Option(
        help="fp16/int8 live in the ONNX itself (also the TensorRT path).")] = Precision["fp32"],
    opset: Annotated[int | None, typer.Option(
        help="ONNX opset (18+ uses the dynamo exporter, older the legacy one). "
        "Default: 18; 19 for int8.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of a --static export.")] = 1,
    dynamic: Annotated[bool, typer.Option(
        "--dynamic/--static", help="Dynamic batch axis, or fixed --batch-size.")] = True,
    calib_dataset: Annotated[DatasetName | None, typer.Option(
        help="Images for int8 calibration (train split when there is one) and for verification.")] = None,
    data_dir: DataDirOpt = None,
    calib_size: Annotated[int, typer.Option(
        min=1, help="Calibration images (class-balanced, seeded).")] = 512,
    calib_method: Annotated[CalibMethod, typer.Option(help="int8 range estimation.")] = CalibMethod["minmax"],
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Check the artifact against eager PyTorch.")] = True,
    verify_samples: Annotated[int, typer.Option(min=1, help="Images used by the parity check.")] = 512,
    atol: Annotated[float, typer.Option(
        min=0, help="fp32: allowed |diff| on logits (plus rtol * |ref|).")] = 1e-4,
    rtol: Annotated[float, typer.Option(min=0, help="fp32: relative part of the logits tolerance.")] = 1e-3,
    min_agreement: Annotated[float, typer.Option(
        min=0, max=1, help="fp16/int8: least top-1 agreement.")] = 0.99,
    max_accuracy_drop: Annotated[float, typer.Option(
        min=0, help="fp16/int8: most accuracy lost (0-1).")] = 0.01,
    device: Annotated[str, typer.Option(help="cpu or cuda (TensorRT needs cuda).")] = "cpu",
    max_batch: Annotated[int | None, typer.Option(
        min=1, help="TensorRT profile's largest batch and Triton's max_batch_size. "
        "Default: max(32, --batch-size).")] = None,
    workspace_gb: Annotated[float | None, typer.Option(
        min=0.1, help="TensorRT builder memory pool (GiB).")] = None,
    timing_cache: Annotated[Path | None, typer.Option(
        help="TensorRT timing cache, read and updated.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Triton model name. Default: the checkpoint's stem.")] = None,
    arch: ArchOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to TorchScript, ONNX (fp32/fp16/int8), TensorRT or a Triton repository, verified.

    Options that belong to other formats (--name for onnx, say) are refused with the valid ones named.
    """
    from export.pipeline import run_export
    from export.verify import Tolerances

    if calib_dataset is not None and calib_dataset.value == "folder" and data_dir is None:
        raise UsageError("--calib-dataset folder needs --data-dir pointing at class-per-subfolder images")
    result = run_export(
        resolve_model(model), _value(format), output, precision=_value(precision), opset=opset,
        batch_size=batch_size, dynamic=dynamic, calib_dataset=calib_dataset.value if calib_dataset else None,
        data_dir=data_dir, calib_size=calib_size, calib_method=_value(calib_method), do_verify=verify,
        verify_samples=verify_samples,
        tolerances=Tolerances(atol=atol, rtol=rtol, min_agreement=min_agreement,
                              max_accuracy_drop=max_accuracy_drop),
        device=device, arch=None if arch == "auto" else arch, allow_pickle=allow_pickle,
        **_given(max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache, name=name),
    )
    if as_json:
        print_json(result.to_dict())
    else:
        from rich.markup import escape

        out = console()
        size = result.size_bytes / 1e6
        out.print(f"[bold]{result.format}[/] {result.precision} -> {escape(str(result.path))} "
                  f"({size:.2f} MB, {result.seconds:.1f} s)")
        if result.verify is not None:
            style = "green" if result.verify.passed else "bold red"
            out.print(f"[{style}]verify {escape(result.verify.summary())}[/]")
        else:
            out.print("[yellow]not verified (--no-verify)[/]")
    result.check()  # VerificationError: one red line, exit 1; the artifact stays aside


def _value(choice: Any) -> str:
    """An Enum choice's value (Typer passes members; a default given as its value stays a str)."""
    return str(getattr(choice, "value", choice))


def _given(**options: Any) -> dict[str, Any]:
    """The format-specific flags the user set: the format refuses the ones it does not take."""
    return {key: value for key, value in options.items() if value is not None}


@app.command()
@handles_errors
def info(model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """Print the card and the facts of any model file: format, precision, shapes, opset/TensorRT \
version, size."""  # one line in `toolkit --help` (rich mode keeps a docstring's line breaks)
    from .artifacts import describe_artifact

    facts = describe_artifact(resolve_model(model))
    if as_json:
        print_json(facts)
        return
    from .report import render_info

    render_info(facts, console())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
