"""What an artifact is, apart from what the model is: `ArtifactFacts`, and each exported format's reader.

The ModelCard says what the model is (architecture, classes, preprocessing); the facts say what this
file is: its format, precision, input/output tensors, and who made it (opset, exporter, toolkit
version, calibration; for TensorRT engines the TensorRT version, GPU, compute capability and profile).
Every exporter writes both the same way, each in its format's own container:

    ONNX         metadata_props  "toolkit.card"  and  "toolkit.artifact"  (JSON)
    TorchScript  _extra_files    "card.json"     and  "artifact.json"
    PT2          extra files     "card.json"     and  "artifact.json"  (torch.export programs and
                                 AOTInductor packages; toolkit/pt2_archive.py tells the two apart)
    TensorRT     sidecars        <engine>.card.json  and  <engine>.facts.json  (never bytes in the engine)

`read_onnx`, `read_torchscript` and `read_engine` read them back as `(card, facts)`: ONNX files with
`onnx` alone, weights left on disk; TorchScript archives as the zip files they are; engines from
their sidecars. None of that imports torch, and nothing here knows about runners: this module is
below the runtime (each runner reads its file here at `open`). `runtime.registry.read_artifact`
picks the reader for any path; `toolkit.describe` is what `toolkit info` prints. Files written
before the facts existed (an ONNX with only `toolkit.precision`, an engine whose card held
`extra["tensorrt"]`, a TorchScript with only its card) still read.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .card import MAX_CARD_BYTES, ModelCard, load_json_bounded, load_sidecar, sidecar_path
from .errors import DataError, ModelFormatError, UsageError, first_line
from .names import EXPORT_PRECISIONS, INPUT_NAME, OUTPUT_NAME
from .paths import read_bytes_bounded, require_file

ONNX_CARD_KEY = "toolkit.card"
ONNX_FACTS_KEY = "toolkit.artifact"
LEGACY_PRECISION_KEY = "toolkit.precision"  # read only: ONNX files written before the facts
LEGACY_CALIBRATION_KEY = "toolkit.calibration"  # read only: likewise
TORCHSCRIPT_CARD_FILE = "card.json"
TORCHSCRIPT_FACTS_FILE = "artifact.json"
FACTS_SUFFIX = ".facts.json"  # the engine's facts sidecar (toolkit.fileio counts it as a companion)
PRECISIONS = EXPORT_PRECISIONS  # what an artifact can carry
# Facts are read from files anyone may hand us: bounded before parsing, as cards are.
MAX_FACTS_BYTES = 1024 * 1024
MAX_FACTS_DEPTH = 16

Dim = int | str  # a fixed size, or a symbolic name ("batch") / "?" for an unknown one


@dataclass(frozen=True)
class TensorFacts:
    """One input or output: name, shape (symbolic dims as names), numpy dtype name."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorFacts:
        shape = data.get("shape")
        if not isinstance(data.get("name"), str) or not isinstance(shape, list | tuple) or \
                not all(isinstance(d, int | str) and not isinstance(d, bool) for d in shape):
            raise DataError(f"tensor facts need a name and a shape of sizes or names, got {dict(data)}")
        return cls(data["name"], tuple(shape), str(data.get("dtype", "float32")))


@dataclass(frozen=True)
class ArtifactFacts:
    """What a file is. Immutable; `replace()` derives a new one. Unknown keys from newer versions are
    kept in `extra`, as ModelCard does."""

    format: str
    precision: str = "fp32"
    inputs: tuple[TensorFacts, ...] = ()
    outputs: tuple[TensorFacts, ...] = ()
    opset: int | None = None
    exporter: str | None = None
    toolkit_version: str | None = __version__
    calibration: str | None = None
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    profile: Mapping[str, int] | None = None  # TensorRT optimisation profile: min/opt/max batch
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "extra", dict(self.extra))
        if self.profile is not None:
            object.__setattr__(self, "profile", dict(self.profile))

    def replace(self, **changes: Any) -> ArtifactFacts:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["profile"] = dict(self.profile) if self.profile is not None else None
        data["extra"] = dict(self.extra)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactFacts:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if not isinstance(kwargs.get("format"), str):
            raise DataError("artifact facts lack their 'format'")
        if kwargs.get("precision", "fp32") not in PRECISIONS:
            raise DataError(f"artifact facts name precision {kwargs.get('precision')!r}; "
                            f"expected one of {', '.join(PRECISIONS)}")
        for key in ("inputs", "outputs"):
            value = kwargs.get(key) or []
            if not isinstance(value, list | tuple) or not all(isinstance(t, Mapping) for t in value):
                raise DataError(f"artifact facts: '{key}' must be a list of tensors")
            kwargs[key] = tuple(TensorFacts.from_dict(t) for t in value)
        profile = kwargs.get("profile")
        if profile is not None and (not isinstance(profile, Mapping)
                                    or not all(isinstance(v, int) for v in profile.values())):
            raise DataError(f"artifact facts: profile must map min/opt/max to batch sizes, got {profile!r}")
        if not isinstance(kwargs.get("extra", {}), Mapping):
            raise DataError("artifact facts: 'extra' must be an object")
        kwargs["extra"] = {**dict(kwargs.get("extra") or {}), **unknown}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactFacts:
        data = load_json_bounded(text, max_bytes=MAX_FACTS_BYTES, max_depth=MAX_FACTS_DEPTH,
                                 what="artifact facts", error=DataError)
        if not isinstance(data, dict):
            raise DataError("artifact facts must be a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        from .fileio import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")


# --- reading what files embed (bounded: size and depth, as card.py bounds cards) ------------------

def card_from_json(text: str | bytes, path: str | Path) -> ModelCard:
    """A card embedded in an artifact; a bad one is a ModelFormatError naming the file."""
    try:
        return ModelCard.from_json(text)
    except (DataError, UsageError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: its model card is unreadable: {first_line(exc)}") from None


def _facts_from_json(text: str | bytes, path: Path) -> ArtifactFacts:
    try:
        return ArtifactFacts.from_json(text)
    except (DataError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: its artifact facts are unreadable: {first_line(exc)}") from None


def _sidecar_card(path: Path, where: str, missing: str | None = None) -> ModelCard:
    """The `<name>.card.json` beside a file that carries no card of its own (`where` names where else
    it could have been); `missing` replaces the message for a file that has none."""
    try:
        card = load_sidecar(path)
    except (DataError, UsageError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: its model card is unreadable: {first_line(exc)}") from None
    if card is None:
        raise ModelFormatError(missing or (
            f"{path} carries no model card ({where} or {sidecar_path(path).name}); "
            "export it with `toolkit export`, or write a card beside it"
        ))
    return card


# --- ONNX -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OnnxHeader:
    """What an ONNX file declares, read with `onnx` alone (weights left on disk)."""

    props: Mapping[str, str]
    inputs: tuple[TensorFacts, ...]  # graph inputs that are not initializers
    outputs: tuple[TensorFacts, ...]
    opset: int | None
    ir_version: int
    producer: str
    nodes: int
    graph_precision: str  # judged from the graph: Q/DQ nodes -> int8, fp16 weights -> fp16, else fp32


def onnx_tensor(value: Any) -> TensorFacts:
    """An ONNX ValueInfoProto as TensorFacts (symbolic dims by name, '?' when unnamed)."""
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, ValueError, TypeError):
        dtype = "?"
    return TensorFacts(value.name, dims, dtype)


def onnx_header(path: str | Path) -> OnnxHeader:
    """Metadata, I/O and opset of an ONNX file. Corrupt or empty files -> ModelFormatError."""
    import onnx

    path = Path(path)
    require_file(path, error=ModelFormatError, what="ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, RuntimeError or ValueError
        raise ModelFormatError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    graph = model.graph
    if not graph.node:
        raise ModelFormatError(f"{path}: not a readable ONNX file (empty graph)")
    initializers = {t.name for t in graph.initializer}
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        graph_precision = "int8"
    elif any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        graph_precision = "fp16"
    else:
        graph_precision = "fp32"
    return OnnxHeader(
        props={p.key: p.value for p in model.metadata_props},
        inputs=tuple(onnx_tensor(v) for v in graph.input if v.name not in initializers),
        outputs=tuple(onnx_tensor(v) for v in graph.output),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        nodes=len(graph.node),
        graph_precision=graph_precision,
    )


def onnx_facts(header: OnnxHeader, path: Path) -> ArtifactFacts:
    """The stored facts (or, for older files, the legacy keys and the graph), with the graph's own I/O."""
    stored = header.props.get(ONNX_FACTS_KEY)
    if stored:
        facts = _facts_from_json(stored, path)
    else:
        legacy = header.props.get(LEGACY_PRECISION_KEY)
        facts = ArtifactFacts("onnx", precision=legacy if legacy in PRECISIONS else header.graph_precision,
                              toolkit_version=None, calibration=header.props.get(LEGACY_CALIBRATION_KEY))
    # the graph is the truth about tensors and opset; the stored facts about how it was made
    return facts.replace(format="onnx", inputs=header.inputs, outputs=header.outputs, opset=header.opset,
                         extra={**facts.extra, "ir_version": header.ir_version, "producer": header.producer,
                                "nodes": header.nodes})


def read_onnx(path: str | Path) -> tuple[ModelCard, ArtifactFacts]:
    """An ONNX file's card and facts from its metadata_props (or, for older files, its sidecar card)."""
    path = Path(path)
    header = onnx_header(path)
    text = header.props.get(ONNX_CARD_KEY)
    card = card_from_json(text, path) if text else _sidecar_card(path, f"metadata '{ONNX_CARD_KEY}'")
    return card, onnx_facts(header, path)


def onnx_metadata(card: ModelCard, facts: ArtifactFacts) -> dict[str, str]:
    """The metadata_props entries an exporter stamps on an ONNX file."""
    return {ONNX_CARD_KEY: card.to_json(), ONNX_FACTS_KEY: facts.to_json()}


# --- TorchScript ----------------------------------------------------------------------------------

def torchscript_extra_files(card: ModelCard, facts: ArtifactFacts) -> dict[str, str]:
    """`_extra_files` for `torch.jit.save`."""
    return {TORCHSCRIPT_CARD_FILE: card.to_json(), TORCHSCRIPT_FACTS_FILE: facts.to_json()}


def archive_extra_files(archive: zipfile.ZipFile, path: Path, names: Sequence[str]) -> dict[str, bytes]:
    """`<root>/extra/<name>` entries of a torch zip archive (TorchScript, PT2), each bounded: by its
    declared size and by what its stream really gives."""
    limits = {TORCHSCRIPT_CARD_FILE: MAX_CARD_BYTES, TORCHSCRIPT_FACTS_FILE: MAX_FACTS_BYTES}
    found = {}
    for info in archive.infolist():
        parts = info.filename.split("/")
        if len(parts) != 3 or parts[1] != "extra" or parts[2] not in names:
            continue
        limit = limits[parts[2]]
        with archive.open(info) as member:
            data = member.read(limit + 1)
        if info.file_size > limit or len(data) > limit:
            raise ModelFormatError(f"{path}: malformed {parts[2]}: over the limit of {limit} bytes")
        found[parts[2]] = data
    return found


def read_torchscript(path: str | Path) -> tuple[ModelCard, ArtifactFacts]:
    """torch.jit.save writes a zip whose `<archive>/extra/<name>` entries are the extra files."""
    path = Path(path)
    require_file(path, error=ModelFormatError, what="TorchScript file")
    try:
        with zipfile.ZipFile(path) as archive:
            extra = archive_extra_files(archive, path, (TORCHSCRIPT_CARD_FILE, TORCHSCRIPT_FACTS_FILE))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFormatError(f"{path}: not a readable TorchScript archive ({first_line(exc)})") from None
    text = extra.get(TORCHSCRIPT_CARD_FILE)
    where = f"extra file '{TORCHSCRIPT_CARD_FILE}'"
    card = card_from_json(text, path) if text else _sidecar_card(path, where)
    stored = extra.get(TORCHSCRIPT_FACTS_FILE)
    if stored:
        facts = _facts_from_json(stored, path)
    else:  # written before the facts: the exporter then only wrote fp32 archives
        facts = ArtifactFacts("torchscript", toolkit_version=None, inputs=(card_input(card),),
                              outputs=(card_output(card),))
    return card, facts.replace(format="torchscript")


# --- TensorRT engines -----------------------------------------------------------------------------

def facts_path(artifact: str | Path) -> Path:
    """`model.engine` -> `model.engine.facts.json`: the facts beside a file that cannot hold them."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + FACTS_SUFFIX)


def engine_card(path: Path) -> ModelCard:
    """An engine's card from its sidecar; a missing one says how to get it back."""
    return _sidecar_card(path, "sidecar", missing=(
        f"{path}: its card {sidecar_path(path).name} is missing; an engine needs the card written beside "
        "it at export: copy it along with the engine, or regenerate both with "
        "toolkit export -m CHECKPOINT --format tensorrt"))


def _legacy_engine_facts(old: Mapping[str, Any]) -> ArtifactFacts:
    """Facts of an engine written before the facts sidecar: its card held them in extra["tensorrt"]."""
    tensors = {k: TensorFacts.from_dict(old[k]) for k in ("input", "output")
               if isinstance(old.get(k), Mapping)}
    named = {"version", "gpu", "compute_capability", "precision", "profile", "input", "output"}
    precision = old.get("precision")
    return ArtifactFacts(
        "tensorrt", precision=precision if precision in PRECISIONS else "fp32",
        inputs=tuple(v for k, v in tensors.items() if k == "input"),
        outputs=tuple(v for k, v in tensors.items() if k == "output"),
        toolkit_version=None, tensorrt_version=old.get("version"), gpu=old.get("gpu"),
        compute_capability=old.get("compute_capability"),
        profile=old.get("profile") if isinstance(old.get("profile"), Mapping) else None,
        extra={k: v for k, v in old.items() if k not in named},
    )


def read_engine(path: str | Path) -> tuple[ModelCard, ArtifactFacts]:
    """An engine's card and facts from its sidecars (the engine's bytes are TensorRT's alone)."""
    path = Path(path)
    require_file(path, error=ModelFormatError, what="TensorRT engine")
    card = engine_card(path)
    sidecar = facts_path(path)
    if sidecar.exists():  # a FIFO or device here is refused, not skipped
        text = read_bytes_bounded(sidecar, MAX_FACTS_BYTES, error=ModelFormatError, what="artifact facts")
        facts = _facts_from_json(text, sidecar)
    elif isinstance(card.extra.get("tensorrt"), Mapping):  # written before this version
        try:
            facts = _legacy_engine_facts(card.extra["tensorrt"])
        except DataError as exc:
            raise ModelFormatError(f"{path}: its card's TensorRT facts are unreadable: {exc}") from None
        card = card.replace(extra={k: v for k, v in card.extra.items() if k != "tensorrt"})
    else:
        facts = ArtifactFacts("tensorrt", toolkit_version=None)
    if not facts.inputs:
        facts = facts.replace(inputs=(card_input(card),), outputs=(card_output(card),))
    return card, facts.replace(format="tensorrt")


def write_engine_sidecars(engine: str | Path, card: ModelCard, facts: ArtifactFacts) -> None:
    """Card and facts beside an engine (before the engine itself appears)."""
    card.save(sidecar_path(engine))
    facts.save(facts_path(engine))


# --- cards and checks -------------------------------------------------------------------------------

def card_input(card: ModelCard, name: str = INPUT_NAME) -> TensorFacts:
    return TensorFacts(name, ("batch", *card.input_size), "float32")


def card_output(card: ModelCard, name: str = OUTPUT_NAME) -> TensorFacts:
    return TensorFacts(name, ("batch", card.num_classes), "float32")


def checkpoint_facts(card: ModelCard) -> ArtifactFacts:
    """A checkpoint holds weights, not facts: fp32, with the card's input and output."""
    return ArtifactFacts("checkpoint", toolkit_version=None, inputs=(card_input(card),),
                         outputs=(card_output(card),))


def check_declared_input(card: ModelCard, declared: Sequence[Dim | None], path: str | Path,
                         what: str) -> None:
    """The artifact's declared input must be (N, *card.input_size); symbolic sizes match anything.

    Checked at open, so a disagreement is one line naming both shapes, not a runtime's traceback later.
    """
    expected = (card.input_size[0], card.height, card.width)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in declared]
    if len(fixed) != 4 or any(d is not None and d != e for d, e in zip(fixed[1:], expected)):
        shown = ", ".join("?" if d is None else str(d) for d in fixed)
        raise ModelFormatError(f"{path}: {what} declares input ({shown}), the card says (N, "
                               f"{', '.join(map(str, expected))}): artifact and card disagree")
