"""`toolkit serve`: models over HTTP (and v2 gRPC), in phases: parse -> configure -> serve.

The models are one or more `-m` files (`-m a.onnx -m b=b.int8.onnx`) or a Triton-layout repository
(`--model-repository`, as `toolkit export --format triton` writes it), with Triton's model control
(`--model-control-mode none|explicit`, `--load-model`). The server's own rules (the wire name, where a
model runs, what a repository folder says) live in serve/ (`serve.config.wire_name`,
`serve.inference.placement`, `serve.repository`), enforced there for every caller; this module only
parses and calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from .common import console, handles_errors, options, resolve_model
from .groups import CardOptions, RunnerOptions

if TYPE_CHECKING:
    from serve.config import ServeConfig
    from serve.repository import ModelSource

LIMITS = "Limits and batching"
MODELS = "Models"


class ControlMode(str, Enum):
    none = "none"
    explicit = "explicit"


@dataclass(frozen=True)
class ServeLimits:
    """Batching and the limits a hardened server needs, as ServeConfig fields (one flag each)."""

    max_batch_size: Annotated[int, typer.Option(min=1, help="Most images per runner call (a repository "
                                                "model's config.pbtxt says its own).",
                                                rich_help_panel=LIMITS)] = 32
    max_delay_ms: Annotated[float, typer.Option(
        min=0, help="Hold a batch open this long for more requests (0: batch whatever queued while the model "
        "was busy).", rich_help_panel=LIMITS)] = 0.0
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting beyond this get 503 + Retry-After.",
                                           rich_help_panel=LIMITS)] = 256
    timeout_s: Annotated[float, typer.Option(min=0.001, help="A request waiting longer gets 504.",
                                             rich_help_panel=LIMITS)] = 30.0
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body; larger gets 413.",
                                               rich_help_panel=LIMITS)] = 16.0
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width x height); larger gets 413.",
                                            rich_help_panel=LIMITS)] = 50_000_000
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections; more get 503.",
                                                 rich_help_panel=LIMITS)] = 512
    read_timeout_s: Annotated[float, typer.Option(
        min=0.1, help="Headers must arrive within this, and the body within 3x this; slower gets 408.",
        rich_help_panel=LIMITS)] = 10.0
    decode_threads: Annotated[int, typer.Option(
        min=1, help="Threads per front-end process that decode and preprocess images.",
        rich_help_panel=LIMITS)] = 2
    reject_nonfinite: Annotated[bool, typer.Option(
        help="Answer 400 to v2 inputs holding NaN/Inf (Triton accepts them).",
        rich_help_panel=LIMITS)] = False

    def config_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        read_timeout = fields.pop("read_timeout_s")
        decode_workers = fields.pop("decode_threads")
        return {**fields, "decode_workers": decode_workers, "header_timeout_s": read_timeout,
                "body_timeout_s": 3 * read_timeout}


@dataclass(frozen=True)
class ModelOptions:
    """Which models the server holds, and Triton's model control."""

    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", metavar="[NAME=]PATH", help="A model file (any artifact `toolkit info` reads); "
        "repeat for several, NAME=PATH names one. Default: configured or sample.", rich_help_panel=MODELS,
        show_default=False)] = None
    model_repository: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Serve every model folder of a Triton model repository "
        "(<name>/config.pbtxt, <name>/<version>/model.onnx), as `toolkit export --format triton` writes it.",
        rich_help_panel=MODELS)] = None
    model_control_mode: Annotated[ControlMode, typer.Option(
        help="none: load every model at start, refuse load/unload; explicit: load --load-model names at "
        "start, then POST /v2/repository/models/NAME/load|unload (Triton's flag).",
        rich_help_panel=MODELS)] = ControlMode.none
    load_model: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="With --model-control-mode explicit: a model to load at start (repeatable; "
        "'*': all).",
        rich_help_panel=MODELS, show_default=False)] = None
    name: Annotated[str | None, typer.Option(
        help="Model name on the wire, for a single -m. Default: the file stem.",
        rich_help_panel=MODELS)] = None

    def startup(self) -> tuple[str, ...]:
        loads = tuple(self.load_model or ())
        if loads and self.model_control_mode is not ControlMode.explicit:
            raise UsageError("--load-model applies with --model-control-mode explicit (in mode none every "
                             "model loads at start)")
        if "*" in loads and len(loads) > 1:
            raise UsageError("--load-model '*' loads every model; give it alone")
        return loads


@handles_errors
@options(card=CardOptions, run=RunnerOptions, limits=ServeLimits, models=ModelOptions)
def serve_command(
    card: CardOptions,
    run: RunnerOptions,
    limits: ServeLimits,
    models: ModelOptions,
    host: Annotated[str, typer.Option(
        help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="TOOLKIT_API_KEY",
        help="Require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (health endpoints stay open).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Front-end processes sharing the port (HTTP, decoding); 1: everything in this process. "
        "Default: one per core, at most 8.")] = None,
    runner_per_worker: Annotated[bool | None, typer.Option(
        "--runner-per-worker/--shared-runner", help="With --workers > 1: a model in every worker, each "
        "batching its own requests, or one inference process whose one batcher all workers feed. "
        "Default: per worker for ONNX Runtime on CPU (faster there), otherwise shared (GPUs: the "
        "biggest batches).", show_default=False)] = None,
    model_instances: Annotated[int | None, typer.Option(
        min=1, help="With --shared-runner: copies of each -m model behind its batcher. Default: ONNX "
        "Runtime on CPU one per worker (each with cores/N threads), otherwise 1.")] = None,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="v2 gRPC port (Triton's "
                                                  "GRPCInferenceService; 0: none). Default: 8001.")] = None,
) -> None:
    """Serve models over HTTP: /predict, /evaluate, Open Inference Protocol v2 (KServe/Triton), \
/metrics, a page."""  # one line in `toolkit --help` (rich mode keeps a docstring's line breaks)
    from serve.config import ServeConfig
    from serve.workers import default_workers

    config = ServeConfig(name=models.name or "model", host=host, port=port, api_key=api_key or None,
                         workers=workers or default_workers(), grpc_port=_grpc_port(grpc_port),
                         model_control=models.model_control_mode.value, load_models=models.startup(),
                         **limits.config_fields())
    source, backend = _source(models, card, run, config, model_instances)
    _announce(config, source, backend)
    _serve(source, config, runner_per_worker, model_instances)


def _source(models: ModelOptions, card: CardOptions, run: RunnerOptions, config: ServeConfig,
            instances: int | None) -> tuple[ModelSource, str]:
    """The models to serve (a repository, or `-m` files by name) and the backend they run on."""
    from serve.config import wire_name
    from serve.repository import FileModels, ModelSettings, RepositoryModels

    batch = config.max_batch_size
    if models.model_repository is not None:
        if models.model or models.name:
            raise UsageError("give either --model-repository or -m/--name, not both")
        if run.allow_pickle:
            raise UsageError("--allow-pickle applies to checkpoints, not to a model repository")
        template = run.spec(str(models.model_repository), card.flags(), batch)  # each version's file: later
        return RepositoryModels(models.model_repository, template, config), f"{template.backend} backend"
    paths = [_named(item) for item in models.model or [""]]
    if models.name and len(paths) > 1:
        raise UsageError("--name names a single -m; name several with -m NAME=PATH")
    specs = {wire_name(path, name or models.name): run.spec(path, card.flags(), batch)
             for name, path in ((n, resolve_model(p or None)) for n, p in paths)}
    if len(specs) < len(paths):
        raise UsageError("two -m models have the same name; name them with -m NAME=PATH")
    backends = sorted({spec.backend_name() for spec in specs.values()})
    return FileModels(specs, ModelSettings.from_config(config, instances)), ", ".join(backends)


def _named(item: str) -> tuple[str | None, str]:
    """`-m NAME=PATH` -> (NAME, PATH); a plain path (or URL) has no name."""
    name, sep, path = item.partition("=")
    if sep and name and "/" not in name and not name.startswith("http"):
        return name, path
    return None, item


def _serve(source: ModelSource, config: ServeConfig, runner_per_worker: bool | None,
           instances: int | None) -> None:
    if config.workers > 1:  # the models open in the inference process (or in every worker)
        from serve.workers import serve_workers

        serve_workers(source, config, config.workers, runner_per_worker=runner_per_worker,
                      instances=instances)
        return
    from serve.server import serve

    serve(source, config)


def _announce(config: ServeConfig, source: ModelSource, backend: str) -> None:
    """Where the server listens, and a warning when it listens beyond this machine without a key."""
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        console(stderr=True).print(f"[yellow]warning:[/] serving on {config.host} without --api-key",
                                   highlight=False)
    names = source.names()
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6})" if len(names) > 6 else "")
    where = f"on http://{config.host}:{config.port}/  v2: /v2/models/<name>"
    where += f"  gRPC: {config.host}:{config.grpc_port}" if config.grpc_port else ""
    where += f"  ({config.workers} workers)" if config.workers > 1 else ""
    control = "" if config.model_control == "none" else f"  model control: {config.model_control}"
    console(stderr=True).print(f"serving {shown or 'no model yet'} ({backend}) {where}{control}", style="dim")


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
