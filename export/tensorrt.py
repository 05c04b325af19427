"""ONNX -> TensorRT engine (TensorRT 10 and 11), with sidecars `<engine>.card.json` and `<engine>.facts.json`.

Precision travels in the ONNX, never in builder flags: fp32, fp16 (fp16 weights and activations,
fp32 I/O) or int8 as Q/DQ nodes. The network is created strongly typed, so TensorRT keeps exactly
the types the ONNX declares. This is the only path TensorRT 11 offers (it removed the FP16/INT8
builder flags and calibrators), and on TensorRT 10 a strongly typed network rejects those flags
anyway, so we never set them: one behaviour on both versions, and the engine's precision is the
one that was verified on the ONNX. TF32 is off by default so an fp32 engine agrees with PyTorch to
~1e-4 (pass `tf32=True` to trade that for speed).

Needs the tensorrt package, cuda-python and an NVIDIA GPU; without them a one-line
BackendUnavailableError says what is missing. The engine is written atomically, and nothing is
glued in front of it, so trtexec, Polygraphy and Triton load it as is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import PRECISIONS, ArtifactFacts, TensorFacts, facts_path, onnx_facts, onnx_header
from toolkit.card import ModelCard, sidecar_path
from toolkit.errors import ExportError, ModelFormatError, UsageError, first_line
from toolkit.fileio import atomic_path, atomic_write_bytes
from toolkit.names import ONNX_PRECISIONS
from toolkit.runtime.base import Runner
from toolkit.runtime.tensorrt_runner import TensorRTEnvironment, tensorrt_environment, trt_logger

from .pipeline import ExportJob, FormatSpec, TensorRTOptions, build_onnx

ENGINE_SUFFIXES = (".engine", ".plan")
DEFAULT_MAX_BATCH = 32  # an engine profile's (and a Triton model's) largest batch: see default_max_batch


def _dtype_name(trt: Any, dtype: Any) -> str:
    """numpy's name for a TensorRT data type ("float32", "float16"), as the sidecar records it."""
    import numpy as np

    return np.dtype(trt.nptype(dtype)).name


def _parse(env: TensorRTEnvironment, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A strongly typed network from the ONNX file (parse_from_file also finds external data)."""
    trt = env.trt
    flags = 0
    if env.major < 11:  # TensorRT 11 is always strongly typed; the flag is deprecated there
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(min(parser.num_errors, 3)))
        raise ExportError(f"TensorRT {env.version} cannot parse {onnx_path.name}: "
                          f"{errors or 'unknown error'}")
    return network, parser


def _load_timing_cache(env: TensorRTEnvironment, config: Any, timing_cache: Path | None) -> Any:
    """Reuse tactic timings across builds; a cache from another GPU/TensorRT is replaced, not trusted."""
    data = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


@dataclass(frozen=True)
class Profile:
    """The optimisation profile's batch sizes (one input, NCHW)."""

    min: int
    opt: int
    max: int

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def __str__(self) -> str:
        return f"min={self.min} opt={self.opt} max={self.max}"


def export(
    onnx_path: str | Path,
    output: str | Path,
    card: ModelCard,
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    precision: str | None = None,
    tf32: bool = False,
    device: str = "cuda",
) -> Path:
    """Build `output` (.engine or .plan) from an ONNX file; its card and facts go beside it.

    `precision` names the ONNX's precision for the facts (default: the ONNX's own facts). A static-batch
    ONNX gets a profile fixed at its batch size. `timing_cache` is read if present and saved after.
    Phases: check the request -> parse the network -> fix the profile -> build -> write engine and sidecars.
    """
    onnx_path, output = Path(onnx_path), Path(output)
    profile = Profile(min_batch, max_batch if opt_batch is None else opt_batch, max_batch)
    _check_request(onnx_path, output, profile, workspace_gb, precision)
    source = onnx_facts(onnx_header(onnx_path), onnx_path)
    env = tensorrt_environment(device, purpose="TensorRT export")
    builder = env.trt.Builder(trt_logger(env.trt))
    if builder is None:
        raise ExportError("TensorRT could not create a builder (is the CUDA driver working?)")
    network, _parser = _parse(env, builder, onnx_path)  # the parser owns weights the network points at
    inp, out = _single_io(network, card, onnx_path)
    if inp.shape[0] > 0:  # static batch: the profile can only be that batch
        fixed = int(inp.shape[0])
        profile = Profile(fixed, fixed, fixed)
    config = _build_config(env, builder, inp.name, card, profile, workspace_gb=workspace_gb, tf32=tf32)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _load_timing_cache(env, config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {env.version} could not build an engine from {onnx_path.name} "
                          "(see the TensorRT messages above; a larger --workspace may help)")
    facts = ArtifactFacts(
        "tensorrt", precision=precision or source.precision, **env.facts(),
        inputs=(TensorFacts(inp.name, tuple(inp.shape), _dtype_name(env.trt, inp.dtype)),),
        outputs=(TensorFacts(out.name, tuple(out.shape), _dtype_name(env.trt, out.dtype)),),
        opset=source.opset, exporter=f"tensorrt {env.version} from {source.exporter or 'onnx'}",
        calibration=source.calibration, profile=profile.to_dict(),
        extra={"strongly_typed": True, "tf32": tf32, "workspace_gb": workspace_gb,
               "source_onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
    )
    _write_engine_file(output, serialized, card, facts)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return output


def _check_request(onnx_path: Path, output: Path, profile: Profile, workspace_gb: float,
                   precision: str | None) -> None:
    """Everything that can be refused before TensorRT is imported."""
    if not 1 <= profile.min <= profile.opt <= profile.max:
        raise UsageError(f"the optimisation profile needs 1 <= min <= opt <= max batch, got {profile}")
    if workspace_gb <= 0:
        raise UsageError(f"workspace must be positive, got {workspace_gb} GB")
    if output.suffix.lower() not in ENGINE_SUFFIXES:
        raise UsageError(f"{output}: a TensorRT engine is named *.engine or *.plan")
    if not onnx_path.is_file():
        raise ModelFormatError(f"ONNX file not found: {onnx_path}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _single_io(network: Any, card: ModelCard, onnx_path: Path) -> tuple[Any, Any]:
    """The network's one input (N, *card.input_size) and one output."""
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise ExportError(f"{onnx_path.name}: expected one input and one output, found "
                          f"{network.num_inputs} and {network.num_outputs}")
    inp, out = network.get_input(0), network.get_output(0)
    in_shape = tuple(inp.shape)
    if len(in_shape) != 4 or in_shape[1:] != tuple(card.input_size):
        raise ExportError(f"{onnx_path.name}: input {inp.name} is {in_shape}, the card says (N, "
                          f"{', '.join(map(str, card.input_size))})")
    return inp, out


def _build_config(env: TensorRTEnvironment, builder: Any, input_name: str, card: ModelCard, profile: Profile,
                  *, workspace_gb: float, tf32: bool) -> Any:
    """Builder config: workspace, TF32 off unless asked (so fp32 engines agree with PyTorch), the profile."""
    trt = env.trt
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    chw = tuple(card.input_size)
    shapes.set_shape(input_name, (profile.min, *chw), (profile.opt, *chw), (profile.max, *chw))
    if config.add_optimization_profile(shapes) < 0:
        raise ExportError(f"TensorRT rejected the profile {profile}")
    return config


def _write_engine_file(output: Path, serialized: Any, card: ModelCard, facts: ArtifactFacts) -> None:
    """The engine, atomically; card and facts first, so the engine appears only with them."""
    try:
        with atomic_path(output) as tmp:
            tmp.write_bytes(memoryview(serialized))
            card.save(sidecar_path(output))
            facts.save(facts_path(output))
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or first_line(exc)}") from None


def default_max_batch(batch_size: int) -> int:
    """The largest batch an engine profile or a Triton model takes unless told: 32, or --batch-size
    when that is larger (so the batch the export was checked at always fits)."""
    return max(DEFAULT_MAX_BATCH, batch_size)


# --- `toolkit export --format tensorrt`: the pipeline's format entry ---------------------------

def engine_options(job: ExportJob) -> dict[str, Any]:
    """Profile, workspace and timing cache from the job's options (flags), with sensible defaults.

    A static ONNX (--static --batch-size N) fixes the profile at N; a dynamic one gets 1..max, where
    max is `max_batch` (default the larger of 32 and --batch-size) and opt defaults to max.
    """
    options = job.option(TensorRTOptions)
    return {"min_batch": options.min_batch, "opt_batch": options.opt_batch,
            "max_batch": options.max_batch or default_max_batch(job.batch_size),
            "workspace_gb": options.workspace_gb, "timing_cache": options.timing_cache, "tf32": options.tf32}


def write_engine(job: ExportJob, path: Path) -> Path:
    """ONNX of `job.precision` (fp32, fp16, or int8 Q/DQ), then the engine and its sidecars at `path`."""
    tensorrt_environment(job.device, purpose="TensorRT export")  # fail before the slow ONNX export
    onnx_tmp = path.with_name(f".{path.name}.onnx")
    try:
        build_onnx(job, onnx_tmp)
        return export(onnx_tmp, path, job.card, precision=job.precision, device=job.device,
                      **engine_options(job))
    finally:
        onnx_tmp.unlink(missing_ok=True)  # the staging folder's other files are published beside the engine


def open_engine(path: Path, job: ExportJob) -> Runner:
    from toolkit.runtime.tensorrt_runner import TensorRTRunner

    return TensorRTRunner.open(path, device=job.device)


FORMAT = FormatSpec("tensorrt", write_engine, ONNX_PRECISIONS, options=(TensorRTOptions,),
                    uses_onnx=True, open_runner=open_engine)
