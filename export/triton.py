"""A Triton Inference Server model directory from an ONNX file or a TensorRT engine.

    <repository>/<name>/config.pbtxt     platform, max_batch_size, input/output, dynamic batching
    <repository>/<name>/labels.txt       class names, one per line (`label_filename` on the output,
                                         so Triton's classification extension answers with names)
    <repository>/<name>/1/model.onnx     or model.plan (platform tensorrt_plan)
    <repository>/<name>/1/model.*.card.json   the card, for engines (ONNX carries it in metadata)

Tensor names and dims are read from the ONNX file (or, for an engine, from the I/O its sidecar card
recorded at build time), never guessed. The whole directory is built beside the target and renamed
into place, so an interrupted export leaves either the old model or the new one, never a mix.
The config is written as text by hand (no tritonclient needed to export); tests parse it with
Triton's own `ModelConfig` protobuf.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import triton_config
from toolkit.artifacts import ONNX_CARD_KEY, ArtifactFacts, TensorFacts, facts_path, onnx_header, read_engine
from toolkit.card import ModelCard, sidecar_path
from toolkit.errors import ExportError, ModelFormatError, UsageError
from toolkit.fileio import atomic_directory, companions
from toolkit.names import ONNX_PRECISIONS
from toolkit.runtime.base import Runner
from toolkit.runtime.registry import FORMATS as ARTIFACT_FORMATS

from .pipeline import ExportJob, FormatSpec, TensorRTOptions, build_onnx
from .tensorrt import DEFAULT_MAX_BATCH, default_max_batch

KINDS = ("KIND_CPU", "KIND_GPU")
MODEL_FORMATS = ("onnx", "tensorrt")  # what a pipeline-built model folder serves
# Triton's default model file per platform; which suffixes map to which platform is the registry's
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
PLATFORMS = {suffix: (fmt.triton_platform, MODEL_FILES[fmt.triton_platform])
             for fmt in ARTIFACT_FORMATS.values() if fmt.triton_platform in MODEL_FILES
             for suffix in fmt.suffixes}
LABELS_FILE = triton_config.LABELS_FILE
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# numpy dtype name (as ArtifactFacts records tensors) -> Triton data_type
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
ONNX_TO_TRITON = {**NUMPY_TO_TRITON, "float64": "TYPE_FP64", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8",
                  "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "bfloat16": "TYPE_BF16"}


def model_name(name: str | None, card: ModelCard) -> str:
    """The directory name Triton serves the model under (and the URL path /v2/models/<name>)."""
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", card.arch)
    if not NAME_PATTERN.match(name):
        raise UsageError(f"model name {name!r}: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit")
    return name


def _onnx_io(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input, output) as {"name", "dtype", "shape"} from the ONNX graph; symbolic dims are -1."""
    header = onnx_header(path)
    if len(header.inputs) != 1 or len(header.outputs) != 1:
        raise ModelFormatError(f"{path}: expected one input and one output, found {len(header.inputs)} and "
                               f"{len(header.outputs)}")

    def describe(tensor: TensorFacts) -> dict[str, Any]:
        if tensor.dtype not in ONNX_TO_TRITON:
            raise ModelFormatError(f"{path}: tensor {tensor.name} has element type {tensor.dtype}, "
                                   "which Triton cannot carry")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in tensor.shape]
        return {"name": tensor.name, "dtype": ONNX_TO_TRITON[tensor.dtype], "shape": dims}

    return describe(header.inputs[0]), describe(header.outputs[0])


def _engine_io(facts: ArtifactFacts, path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(input, output, profile max batch) recorded by export.tensorrt in the engine's facts."""

    def describe(tensor: TensorFacts) -> dict[str, Any]:
        dtype = NUMPY_TO_TRITON.get(tensor.dtype)
        if dtype is None:
            raise ModelFormatError(f"{path}: engine tensor {tensor.name} is {tensor.dtype}; "
                                   "expected float32 or float16")
        shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
        return {"name": tensor.name, "dtype": dtype, "shape": shape}

    if not facts.inputs or not facts.outputs or not facts.profile or "max" not in facts.profile:
        raise ModelFormatError(f"{path}: its facts lack the engine's I/O and profile; rebuild it with "
                               "toolkit export --format tensorrt")
    return describe(facts.inputs[0]), describe(facts.outputs[0]), int(facts.profile["max"])


def _dims(shape: Sequence[int], max_batch_size: int, what: str) -> list[int]:
    """Triton dims exclude the batch dim when the model batches (max_batch_size > 0)."""
    if max_batch_size == 0:
        return list(shape)
    if not shape or shape[0] != -1:
        raise ExportError(f"{what} has a fixed batch dimension {list(shape)}; Triton batching needs a "
                          "dynamic one: "
                          "export the ONNX with --dynamic, or use max_batch_size=0")
    return list(shape[1:])


def config_text(*, name: str, platform: str, max_batch_size: int, inp: dict[str, Any], out: dict[str, Any],
                dynamic_batching: bool, preferred_batch_sizes: Sequence[int] | None, max_queue_delay_us: int,
                instance_count: int, kind: str, card: ModelCard) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig).

    The card rides along as the string parameter `toolkit.card`: Triton returns it from
    GET /v2/models/<name>/config, so `toolkit eval -m http://host:8000/<name>` gets the exact
    preprocessing and class names back (backends ignore parameters they do not know).
    """
    in_dims = _dims(inp["shape"], max_batch_size, f"input {inp['name']}")
    out_dims = _dims(out["shape"], max_batch_size, f"output {out['name']}")
    return triton_config.to_pbtxt(triton_config.build(
        name=name, platform=platform, max_batch_size=max_batch_size,
        inputs=[triton_config.tensor(inp["name"], inp["dtype"], in_dims)],
        outputs=[triton_config.tensor(out["name"], out["dtype"], out_dims, LABELS_FILE)], card=card,
        instance_count=instance_count, kind=kind, dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_batch_sizes, max_queue_delay_us=max_queue_delay_us))


def _external_data_files(path: Path) -> list[str]:
    """Files an ONNX model keeps its large weights in (models over 2 GB); they must travel with it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    unsafe = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if unsafe:
        raise ModelFormatError(f"{path}: external data outside the model's folder ({unsafe[0]}); "
                               "refusing to copy it")
    return sorted(names)  # locations relative to the ONNX file, as the model names them


@dataclass(frozen=True)
class _Served:
    """What goes into a model folder, read from the model file: I/O, the card and what travels along."""

    inp: dict[str, Any]
    out: dict[str, Any]
    card: ModelCard  # for labels.txt and the config's card parameter
    sidecar_card: ModelCard | None  # written beside the model file when the file carries none
    facts: ArtifactFacts | None  # an engine's facts (TensorRT version, GPU, profile) travel with it
    extra_files: tuple[str, ...] = ()  # an ONNX file's external weights, relative to it


def export(
    model_file: str | Path,
    repository: str | Path,
    card: ModelCard,
    *,
    name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    dynamic_batching: bool = True,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 500,
    instance_count: int = 1,
    kind: str | None = None,
    version: int = 1,
) -> Path:
    """Write `<repository>/<name>/` for `model_file` (.onnx, or a .engine/.plan with its sidecar card).

    `card` is used when the model file carries none (an ONNX file's embedded card, an engine's sidecar
    win, being what open_model reads). `kind` defaults to KIND_GPU for engines and KIND_CPU for ONNX.
    Phases: check the request -> read the model file -> write config, labels and model, swapped in whole.
    Returns the model directory.
    """
    model_file, repository = Path(model_file), Path(repository)
    platform, file_name = _platform(model_file)
    is_engine = platform == "tensorrt_plan"
    kind = kind or ("KIND_GPU" if is_engine else "KIND_CPU")
    name = model_name(name, card)
    _check_settings(is_engine=is_engine, kind=kind, max_batch_size=max_batch_size,
                    preferred_batch_sizes=preferred_batch_sizes, max_queue_delay_us=max_queue_delay_us,
                    instance_count=instance_count, version=version)
    served = _read_engine(model_file, max_batch_size) if is_engine else _read_onnx(model_file, card)
    config = config_text(name=name, platform=platform, max_batch_size=max_batch_size, inp=served.inp,
                         out=served.out, dynamic_batching=dynamic_batching,
                         preferred_batch_sizes=preferred_batch_sizes, max_queue_delay_us=max_queue_delay_us,
                         instance_count=instance_count, kind=kind, card=served.card)
    _write_model_folder(repository / name, version, model_file, file_name, config, served)
    return repository / name


def _platform(model_file: Path) -> tuple[str, str]:
    """(Triton platform, model file name in the version folder), from the suffix."""
    suffix = model_file.suffix.lower()
    if suffix not in PLATFORMS:
        raise UsageError(f"{model_file}: Triton export takes an ONNX file or a TensorRT engine "
                         "(.engine/.plan)")
    if not model_file.is_file():
        raise ModelFormatError(f"model file not found: {model_file}")
    return PLATFORMS[suffix]


def _check_settings(*, is_engine: bool, kind: str, max_batch_size: int,
                    preferred_batch_sizes: Sequence[int] | None, max_queue_delay_us: int, instance_count: int,
                    version: int) -> None:
    """Every problem with the config's settings at once, in one UsageError."""
    problems = []
    if kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}")
    if is_engine and kind != "KIND_GPU":
        problems.append("a TensorRT plan runs only with kind KIND_GPU")
    if max_batch_size < 0:
        problems.append("max_batch_size must be >= 0")
    if instance_count < 1:
        problems.append("instance_count must be >= 1")
    if max_queue_delay_us < 0:
        problems.append("max_queue_delay_us must be >= 0")
    if version < 1:
        problems.append("version must be >= 1")
    if preferred_batch_sizes and not all(1 <= b <= max_batch_size for b in preferred_batch_sizes):
        problems.append(f"preferred batch sizes must lie in 1..{max_batch_size}")
    if problems:
        raise UsageError("Triton export: " + "; ".join(problems))


def _read_engine(model_file: Path, max_batch_size: int) -> _Served:
    """An engine's I/O and profile from its facts; its sidecar card travels with it."""
    engine_card, engine_facts = read_engine(model_file)
    inp, out, profile_max = _engine_io(engine_facts, model_file)
    if max_batch_size > profile_max:
        raise UsageError(f"max_batch_size {max_batch_size} exceeds the engine's profile max batch "
                         f"{profile_max}")
    return _checked(_Served(inp, out, engine_card, engine_card, engine_facts), model_file)


def _read_onnx(model_file: Path, card: ModelCard) -> _Served:
    """An ONNX file's I/O from its graph; `card` goes beside it only when the file embeds none."""
    inp, out = _onnx_io(model_file)
    embedded = onnx_header(model_file).props.get(ONNX_CARD_KEY)
    served_card = ModelCard.from_json(embedded) if embedded else card
    return _checked(_Served(inp, out, served_card, None if embedded else card, None,
                            tuple(_external_data_files(model_file))), model_file)


def _checked(served: _Served, model_file: Path) -> _Served:
    """labels.txt holds one class per line, and as many as the output has."""
    if any("\n" in c or "\r" in c for c in served.card.class_names):
        raise UsageError("Triton export: class names may not contain line breaks "
                         "(labels.txt holds one per line)")
    out = served.out
    if out["shape"] and out["shape"][-1] not in (-1, served.card.num_classes):
        raise ExportError(f"{model_file.name}: output {out['name']} has {out['shape'][-1]} classes, the card "
                          f"names {served.card.num_classes}")
    return served


def _write_model_folder(folder: Path, version: int, model_file: Path, file_name: str, config: str,
                        served: _Served) -> None:
    """config.pbtxt, labels.txt and <version>/<model file> (+ external data, card, facts), staged beside
    `folder` and renamed into place."""
    with atomic_directory(folder) as staging:
        version_dir = staging / str(version)
        version_dir.mkdir()
        (staging / "config.pbtxt").write_text(config, "utf-8")
        (staging / LABELS_FILE).write_text("\n".join(served.card.class_names) + "\n", "utf-8")
        shutil.copyfile(model_file, version_dir / file_name)
        for location in served.extra_files:
            (version_dir / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_file.parent / location, version_dir / location)
        if served.sidecar_card is not None:
            served.sidecar_card.save(sidecar_path(version_dir / file_name))
        if served.facts is not None:
            served.facts.save(facts_path(version_dir / file_name))
        os.chmod(version_dir, 0o755)  # a server usually runs as another user


# --- `toolkit export --format triton -o repo/`: the pipeline's format entry --------------------

@dataclass(frozen=True)
class TritonOptions:
    """The model folder's name and config; `model_format="tensorrt"` serves an engine (TensorRTOptions)."""

    name: str | None = None  # default: the checkpoint's stem
    model_format: str = "onnx"
    max_batch: int | None = None  # default: tensorrt.default_max_batch(--batch-size); an engine's profile max
    kind: str | None = None  # KIND_CPU / KIND_GPU; default from the device and model format
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int = 500
    instance_count: int = 1

    def __post_init__(self) -> None:
        if self.model_format not in MODEL_FORMATS:
            raise UsageError(f"Triton model format {self.model_format!r}: "
                             f"choose {' or '.join(MODEL_FORMATS)}")
        if self.kind is not None and self.kind not in KINDS:
            raise UsageError(f"Triton kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1, got {self.max_batch}")


def job_model_name(job: ExportJob) -> str:
    """The `name` option, else the checkpoint's stem (resnet20_digits.pt -> resnet20_digits)."""
    given = job.option(TritonOptions).name
    return model_name(given or re.sub(r"[^A-Za-z0-9_.-]+", "_", job.checkpoint.stem).lstrip("_.-") or None,
                      job.card)


def write_repository(job: ExportJob, path: Path) -> Path:
    """The model folder at `path` (staged; its name is the model's name), built from the ONNX of
    `job.precision`, or from a TensorRT engine with `TritonOptions(model_format="tensorrt")`.
    The pipeline swaps it into the repository; nothing else there is touched."""
    options = job.option(TritonOptions)
    engine = options.model_format == "tensorrt"
    source = path.with_name(f".{path.name}.model" + (".engine" if engine else ".onnx"))
    try:
        if engine:
            from . import tensorrt

            tensorrt.write_engine(job, source)
            max_batch = _engine_io(read_engine(source)[1], source)[2]  # never above the profile
        else:
            build_onnx(job, source)
            if _onnx_io(source)[0]["shape"][:1] == [-1]:
                max_batch = int(options.max_batch or default_max_batch(job.batch_size))
            else:  # a --static ONNX: Triton sends it whole batches of exactly that size
                max_batch = 0
        on_gpu = engine or job.device.startswith("cuda")
        kind = options.kind or ("KIND_GPU" if on_gpu else "KIND_CPU")
        export(source, path.parent, job.card, name=path.name, max_batch_size=max_batch, kind=kind,
               preferred_batch_sizes=options.preferred_batch_sizes,
               max_queue_delay_us=options.max_queue_delay_us, instance_count=options.instance_count)
    finally:
        for leftover in (source, *companions(source)):  # the pipeline publishes only the model folder
            leftover.unlink(missing_ok=True)
    return path


def open_model_folder(path: Path, job: ExportJob) -> Runner:
    from toolkit.runtime.registry import open_model

    return open_model(path, device=job.device)


FORMAT = FormatSpec("triton", write_repository, ONNX_PRECISIONS,
                    options=(TritonOptions, TensorRTOptions), uses_onnx=True, model_folder=job_model_name,
                    open_runner=open_model_folder,
                    default_name=lambda p: "_triton" if p == "fp32" else f"_triton_{p}")
