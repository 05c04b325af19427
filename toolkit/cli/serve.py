"""`toolkit serve`: any artifact over HTTP (and v2 gRPC), in phases: parse -> configure -> place -> serve.

The server's own rules (the wire name, where the model runs) live in serve/ (`serve.config.wire_name`,
`serve.inference.placement`), enforced there for every caller; this module only parses and calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .common import ModelOpt, console, handles_errors, options, resolve_model
from .groups import CardOptions, RunnerOptions

LIMITS = "Limits and batching"


@dataclass(frozen=True)
class ServeLimits:
    """Batching and the limits a hardened server needs, as ServeConfig fields (one flag each)."""

    max_batch_size: Annotated[int, typer.Option(min=1, help="Most images per runner call.",
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


@handles_errors
@options(card=CardOptions, run=RunnerOptions, limits=ServeLimits)
def serve_command(
    card: CardOptions,
    run: RunnerOptions,
    limits: ServeLimits,
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(
        help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    name: Annotated[str | None, typer.Option(help="Model name on the wire. Default: the file stem.")] = None,
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
        min=1, help="With --shared-runner: copies of the model behind the one batcher. Default: ONNX "
        "Runtime on CPU one per worker (each with cores/N threads), otherwise 1.")] = None,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="v2 gRPC port (Triton's "
                                                  "GRPCInferenceService; 0: none). Default: 8001.")] = None,
) -> None:
    """Serve MODEL over HTTP: /predict, /evaluate, Open Inference Protocol v2 (KServe/Triton), \
/metrics, a page."""  # one line in `toolkit --help` (rich mode keeps a docstring's line breaks)
    from serve.config import ServeConfig, wire_name
    from serve.workers import default_workers

    path = resolve_model(model)
    spec = run.spec(path, card.flags(), limits.max_batch_size)
    config = ServeConfig(name=wire_name(path, name), host=host, port=port, api_key=api_key or None,
                         workers=workers or default_workers(), grpc_port=_grpc_port(grpc_port),
                         **limits.config_fields())
    _announce(config, spec)
    if config.workers > 1:  # the model opens in the inference process (or in every worker)
        from serve.workers import serve_workers

        serve_workers(spec, config, config.workers, runner_per_worker=runner_per_worker,
                      instances=model_instances)
        return
    from serve.server import serve

    with spec.open() as runner:
        serve(runner, config)


def _announce(config: Any, spec: Any) -> None:
    """Where the server listens, and a warning when it listens beyond this machine without a key."""
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        console(stderr=True).print(f"[yellow]warning:[/] serving on {config.host} without --api-key",
                                   highlight=False)
    where = f"on http://{config.host}:{config.port}/  v2: /v2/models/{config.name}"
    where += f"  gRPC: {config.host}:{config.grpc_port}" if config.grpc_port else ""
    where += f"  ({config.workers} workers)" if config.workers > 1 else ""
    console(stderr=True).print(f"serving {config.name} ({spec.backend_name()}) {where}", style="dim")


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
