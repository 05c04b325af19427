"""The option groups several commands share, each declared once (see `common.options`).

- `CardOptions`: the card flags of every command that builds a card (validate, export, eval, predict,
  compare, serve, benchmark);
- `RunnerOptions`: how a model is opened and run (backend, device, precision, GPU speed-ups);
- `EngineOptions`: where batch work runs (local threads or Ray), for eval and predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..card import INTERPOLATIONS
from ..engines import DEFAULT_ENGINE, ENGINES
from ..errors import UsageError
from ..names import COMPILE_MODES, RUN_PRECISIONS
from ..runtime.registry import BACKENDS
from .common import Choice, DeviceName, choices, value

if TYPE_CHECKING:
    from ..card_layers import CardFlags
    from ..engines import RunnerSpec

    class BackendName(Choice): ...
    class RunPrecision(Choice): ...
    class CompileMode(Choice): ...
    class EngineName(Choice): ...
    class Interpolation(Choice): ...
else:
    # --backend: "auto" and every backend of the registry (toolkit/runtime/registry.py BACKENDS)
    BackendName = choices("BackendName", ("auto", *BACKENDS))
    RunPrecision = choices("RunPrecision", RUN_PRECISIONS)
    CompileMode = choices("CompileMode", COMPILE_MODES)
    EngineName = choices("EngineName", ENGINES)
    Interpolation = choices("Interpolation", INTERPOLATIONS)

CARD = "Card (flag > card in or beside the artifact > checkpoint config > known weights > preset)"
RUN = "How the model runs"
ENGINE = "Where the work runs"


@dataclass(frozen=True)
class CardOptions:
    """The card flags; `flags()` parses them (one UsageError naming a malformed flag)."""

    classes: Annotated[str | None, typer.Option(
        help="cifar10, cifar100, imagenet, or a file of class names (one per line, or a JSON list).",
        rich_help_panel=CARD)] = None
    mean: Annotated[str | None, typer.Option(
        help="Normalisation mean, R,G,B (0-1, or 0-255).", rich_help_panel=CARD, show_default=False)] = None
    std: Annotated[str | None, typer.Option(
        help="Normalisation std, R,G,B (0-1, or 0-255).", rich_help_panel=CARD, show_default=False)] = None
    input_size: Annotated[str | None, typer.Option(
        help="Model input in pixels: N or HxW.", rich_help_panel=CARD, show_default=False)] = None
    resize: Annotated[int | None, typer.Option(
        help="Resize the shorter side to N before the centre crop.", rich_help_panel=CARD)] = None
    crop_pct: Annotated[float | None, typer.Option(
        help="timm's way to say --resize: resize = floor(input / crop_pct).", rich_help_panel=CARD)] = None
    interpolation: Annotated[Interpolation | None, typer.Option(
        help="Resize filter.", rich_help_panel=CARD)] = None

    def flags(self) -> CardFlags:
        from ..card_layers import CardFlags

        return CardFlags.parse(
            classes=self.classes, mean=self.mean, std=self.std, input_size=self.input_size,
            resize=self.resize, crop_pct=self.crop_pct,
            interpolation=value(self.interpolation) if self.interpolation is not None else None)


@dataclass(frozen=True)
class RunnerOptions:
    """How to open and run the model: backend, device, and the runners' speed options."""

    backend: Annotated[BackendName, typer.Option(
        help="Runtime; auto picks the artifact's default.", rich_help_panel=RUN)] = BackendName["auto"]
    device: Annotated[DeviceName, typer.Option(help="Where to run the model.", rich_help_panel=RUN)] = (
        DeviceName.cpu)
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Allow checkpoints that carry pickled code (whole nn.Module). Only for files "
        "you trust.", rich_help_panel=RUN)] = False
    precision: Annotated[RunPrecision | None, typer.Option(
        help="torch/torchscript: compute in fp32, fp16 or bf16 (weights cast once; eval checks fp16/bf16 "
        "against fp32 on a sample). Default: fp32.", rich_help_panel=RUN)] = None
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="torch/torchscript on cuda: capture a CUDA graph per batch shape (the last "
        "batch padded).", rich_help_panel=RUN)] = False
    compile: Annotated[CompileMode | None, typer.Option(
        "--compile", help="torch: torch.compile the model (fixed batch shapes; eager if it cannot compile).",
        rich_help_panel=RUN)] = None
    compile_cache: Annotated[Path | None, typer.Option(
        help="--compile: inductor's cache folder, reused by later runs. Default: "
        "~/.cache/resnet-toolkit/inductor.", rich_help_panel=RUN)] = None
    trt: Annotated[bool, typer.Option(
        "--trt", help="onnxruntime on cuda: ONNX Runtime's TensorRT execution provider (engines cached in "
        "--trt-cache).", rich_help_panel=RUN)] = False
    trt_cache: Annotated[Path | None, typer.Option(
        help="--trt: engine cache folder. Default: ~/.cache/resnet-toolkit/ort-trt.",
        rich_help_panel=RUN)] = None

    def speed_options(self, batch_size: int | None = None) -> dict[str, Any]:
        """The runner options the user set (only those, so other backends are not offered them)."""
        return speed_options(self.precision, self.cuda_graphs, self.compile, self.compile_cache, self.trt,
                             self.trt_cache, batch_size)

    def spec(self, model: str, card: CardFlags | None = None, batch_size: int | None = None) -> RunnerSpec:
        """What to open (engines open it where the work runs: here, or in each Ray replica)."""
        return runner_spec(model, self.backend, self.device, self.allow_pickle, card,
                           self.speed_options(batch_size))


def speed_options(precision: Any = None, cuda_graphs: bool = False, compile: Any = None,
                  compile_cache: Path | None = None, trt: bool = False, trt_cache: Path | None = None,
                  batch_size: int | None = None) -> dict[str, Any]:
    """The GPU speed options (issue 12) as runner options; a cache flag without its feature is refused."""
    options: dict[str, Any] = {}
    if precision is not None:
        options["precision"] = value(precision)
    if cuda_graphs:
        options["cuda_graphs"] = True
    if compile is not None:
        options["compile"] = value(compile)
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


def runner_spec(model: str, backend: Any, device: Any, allow_pickle: bool, card: CardFlags | None = None,
                extra: dict[str, Any] | None = None) -> RunnerSpec:
    """A RunnerSpec; --allow-pickle only for checkpoints (other formats hold no pickles)."""
    from ..engines import RunnerSpec
    from ..runtime.registry import detect_format

    options = dict(extra or {})
    if allow_pickle:
        if detect_format(model) != "checkpoint":
            raise UsageError("--allow-pickle applies to checkpoints only (other formats hold no pickles)")
        options["allow_pickle"] = True
    return RunnerSpec(model, value(backend), value(device), options, card_flags=card or None)


@dataclass(frozen=True)
class EngineOptions:
    """--engine and its options (issue 13); --workers belongs to the local engine."""

    engine: Annotated[EngineName, typer.Option(
        help="Where the work runs: local (this process) or ray (Ray Data on a local or existing Ray cluster; "
        "resumable).", rich_help_panel=ENGINE)] = EngineName[DEFAULT_ENGINE]
    address: Annotated[str | None, typer.Option(
        help="--engine ray: the cluster to join, 'auto' (RAY_ADDRESS or the running one) or "
        "ray://host:10001. "
        "Default: start one here.", rich_help_panel=ENGINE)] = None
    replicas: Annotated[int | None, typer.Option(
        min=1, help="--engine ray: model replicas (actors). Default: one per GPU with --device cuda, else "
        "one "
        "per 4 CPUs.", rich_help_panel=ENGINE)] = None
    shard_size: Annotated[int | None, typer.Option(
        min=1, help="--engine ray: rows per output shard (predictions/part-NNNNN.parquet). Default: 1000.",
        rich_help_panel=ENGINE)] = None
    workers: Annotated[int | None, typer.Option(
        min=1, help="Threads that decode image files. Default: every core.", rich_help_panel=ENGINE)] = None

    @property
    def module(self) -> Any:
        from ..engines import get_engine

        return get_engine(value(self.engine))

    def run_options(self) -> dict[str, Any]:
        """The options of the chosen engine's evaluate/predict."""
        engine = value(self.engine)
        if self.workers is not None and engine != DEFAULT_ENGINE:
            raise UsageError("--workers applies to --engine local (Ray Data decodes in its own tasks)")
        chosen = {"address": self.address, "replicas": self.replicas, "shard_size": self.shard_size,
                  "workers": self.workers}
        return {name: option for name, option in chosen.items() if option is not None}

    def label(self, spec: RunnerSpec) -> str:
        """What the progress bar names: the backend, and the engine when it is not the local one."""
        engine = value(self.engine)
        return spec.backend_name() + ("" if engine == DEFAULT_ENGINE else f" on {engine}")


class PredictFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
