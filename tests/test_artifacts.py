"""Artifact facts (toolkit/artifacts.py) and the backend/format registry (toolkit/runtime/registry.py).

Facts are written the same way by every exporter and read back by one function (`registry.read_artifact`,
through each format's reader); files written before the facts existed still read; a throwaway backend
proves "a new backend = its module + one registry line", a throwaway format "a new format = its reader
+ one registry line".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fakes.tensorrt as fake_trt
from toolkit.artifacts import (
    ONNX_CARD_KEY,
    ONNX_FACTS_KEY,
    ArtifactFacts,
    TensorFacts,
    card_input,
    card_output,
    write_engine_sidecars,
)
from toolkit.card import ModelCard, sidecar_path
from toolkit.describe import describe_artifact
from toolkit.errors import ModelFormatError, UsageError
from toolkit.evaluate import collect_logits
from toolkit.runtime import registry
from toolkit.runtime.base import Runner
from toolkit.runtime.registry import Backend, detect_format, open_model, read_artifact

TESTS = Path(__file__).parent


def _without(proto_path: Path, out: Path, *keys: str, extra: dict[str, str] | None = None) -> Path:
    """A copy of an ONNX file with metadata keys removed (and others set), as older versions wrote them."""
    import onnx

    proto = onnx.load(str(proto_path))
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in keys}
    kept.update(extra or {})
    del proto.metadata_props[:]
    for key, value in kept.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return out


# --- ONNX -----------------------------------------------------------------------------------------

def test_onnx_fp32_facts_round_trip(sample_onnx_fp32, sample_card):
    card, facts = read_artifact(sample_onnx_fp32)
    assert card == sample_card
    assert facts.format == "onnx" and facts.precision == "fp32" and facts.opset == 18
    assert facts.exporter.startswith("torch.onnx ") and facts.toolkit_version and facts.calibration is None
    assert facts.inputs == (TensorFacts("input", ("batch", 3, 32, 32), "float32"),)
    assert facts.outputs[0].shape[-1] == sample_card.num_classes and facts.outputs[0].dtype == "float32"
    assert ArtifactFacts.from_json(facts.to_json()) == facts
    import onnx

    props = {p.key for p in onnx.load(str(sample_onnx_fp32), load_external_data=False).metadata_props}
    assert {ONNX_CARD_KEY, ONNX_FACTS_KEY} <= props and "toolkit.precision" not in props  # one place only


@pytest.mark.slow
def test_onnx_fp16_and_int8_facts(sample_model, sample_onnx_int8, tmp_path):
    from export.onnx import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    fp16 = export(model, card, tmp_path / "m.fp16.onnx", precision="fp16")
    assert read_artifact(fp16)[1].precision == "fp16"
    assert read_artifact(fp16)[1].inputs[0].dtype == "float32"  # fp32 edges around fp16 insides
    _, int8 = read_artifact(sample_onnx_int8)
    assert int8.precision == "int8" and "method=minmax" in int8.calibration and "seed=0" in int8.calibration
    assert "onnxruntime.quantization" in int8.exporter
    with open_model(fp16) as runner:
        assert runner.precision == "fp16" and runner.facts.precision == "fp16"


@pytest.mark.slow
def test_older_onnx_files_still_read(sample_onnx_fp32, sample_onnx_int8, tmp_path):
    """Before the facts: `toolkit.precision` (+ `toolkit.calibration`) only, or nothing but the card."""
    old_int8 = _without(sample_onnx_int8, tmp_path / "old.int8.onnx", ONNX_FACTS_KEY,
                        extra={"toolkit.precision": "int8", "toolkit.calibration": "sample; method=minmax"})
    _, facts = read_artifact(old_int8)
    assert facts.precision == "int8" and facts.calibration == "sample; method=minmax"
    bare = _without(sample_onnx_int8, tmp_path / "bare.onnx", ONNX_FACTS_KEY)
    assert read_artifact(bare)[1].precision == "int8"  # judged from the Q/DQ graph
    with open_model(bare, backend="openvino") as runner:
        assert runner.precision == "int8"
    info = describe_artifact(_without(sample_onnx_fp32, tmp_path / "old.onnx", ONNX_FACTS_KEY,
                                      extra={"toolkit.precision": "fp32"}))
    assert info["precision"] == "fp32" and info["inputs"][0]["shape"] == ["batch", 3, 32, 32]


@pytest.mark.slow
def test_deeply_nested_card_or_facts_is_malformed_not_a_recursion_error(sample_onnx_fp32, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    for key in (ONNX_CARD_KEY, ONNX_FACTS_KEY):
        path = _without(sample_onnx_fp32, tmp_path / f"{key}.onnx", extra={key: deep})
        for reader in (read_artifact, open_model, describe_artifact):
            with pytest.raises(ModelFormatError, match="malformed") as info:
                reader(path)
            assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_input_that_disagrees_with_its_card_is_refused_at_open(sample_onnx_fp32, sample_card, tmp_path,
                                                                   backend):
    wrong = sample_card.replace(input_size=(3, 64, 64), resize_size=64)
    path = _without(sample_onnx_fp32, tmp_path / "wrong.onnx", extra={ONNX_CARD_KEY: wrong.to_json()})
    expected = r"declares input \(\?, 3, 32, 32\), the card says \(N, 3, 64, 64\)"
    with pytest.raises(ModelFormatError, match=expected):
        open_model(path, backend=backend)


# --- TorchScript ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torchscript_facts_round_trip(sample_model, sample_card, sample_test, tmp_path, precision):
    from export import torchscript
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    path = torchscript.export(model, card, tmp_path / "m.ts", precision=precision)
    read_card, facts = read_artifact(path)
    assert read_card == card and facts.format == "torchscript" and facts.precision == precision
    assert facts.exporter.startswith("torch.jit.trace") and facts.inputs[0].shape == ("batch", 3, 32, 32)
    assert describe_artifact(path)["precision"] == precision  # `info` used to say fp32 for every archive
    subset = sample_test.subset(64)
    with open_model(path) as runner, open_model(sample_model) as eager:
        assert runner.precision == precision
        got, expected = collect_logits(runner, subset), collect_logits(eager, subset)
    if precision == "fp32":
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    else:
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95 and got.dtype == np.float32


@pytest.mark.slow
def test_older_torchscript_without_facts_reads_as_fp32(sample_model, tmp_path):
    from export import torchscript
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    new = torchscript.export(model, card, tmp_path / "new.ts")
    old = tmp_path / "old.ts"
    with zipfile.ZipFile(new) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("/extra/artifact.json"):
                target.writestr(item, source.read(item))
    read_card, facts = read_artifact(old)
    assert read_card == card and facts.precision == "fp32" and facts.toolkit_version is None


# --- TensorRT engines (simulated) -----------------------------------------------------------------

def test_engine_facts_sidecar_round_trip(monkeypatch, sample_onnx_fp32, sample_card, tmp_path):
    from export.tensorrt import export

    fake_trt.install(monkeypatch)
    engine = export(sample_onnx_fp32, tmp_path / "m.engine", sample_card, max_batch=8)
    card, facts = read_artifact(engine)
    assert card == sample_card.replace(toolkit_version=card.toolkit_version) and "tensorrt" not in card.extra
    assert json.loads(sidecar_path(engine).read_text()).keys() == card.to_dict().keys()  # the card only
    assert facts.format == "tensorrt" and facts.precision == "fp32" and facts.tensorrt_version == "10.9.0"
    assert facts.profile == {"min": 1, "opt": 8, "max": 8} and facts.opset == 18
    info = describe_artifact(engine)
    assert info["precision"] == "fp32" and info["gpu"] == "Simulated GPU"
    assert info["size_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())  # engine + both sidecars


def test_engine_precision_comes_from_facts(sample_card, tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"\0" * 16)
    write_engine_sidecars(engine, sample_card, ArtifactFacts("tensorrt", precision="int8"))
    card, facts = read_artifact(engine)
    assert card == sample_card and facts.precision == "int8"
    assert facts.inputs[0].shape == ("batch", 3, 32, 32)  # from the card when the facts name no tensors


# --- info -----------------------------------------------------------------------------------------

def test_info_json_keys(sample_onnx_fp32, sample_onnx_int8):
    from support.cli import invoke

    for path, precision in ((sample_onnx_fp32, "fp32"), (sample_onnx_int8, "int8")):
        result = invoke("info", "-m", path, "--json")
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert {"path", "format", "precision", "card", "inputs", "outputs", "opset", "size_bytes",
                "exporter", "toolkit_version"} <= set(info)
        assert info["format"] == "onnx" and info["precision"] == precision
        assert info["size_bytes"] == Path(path).stat().st_size


# --- detecting torch files by content (issue 8 item 9) ----------------------------------------------

@pytest.mark.parametrize("name", ["resnet20-12fca82f.th", "weights.bin", "model.tar", "noext"])
def test_torch_checkpoints_by_content(sample_model, tmp_path, name):
    import torch

    state = torch.load(sample_model, weights_only=True)
    zipped, legacy = tmp_path / name, tmp_path / f"legacy-{name}"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert detect_format(zipped) == detect_format(legacy) == "checkpoint"


def test_safetensors_and_non_torch_files(sample_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    state = torch.load(sample_model, weights_only=True)
    tensors = {k: v.contiguous() for k, v in (state.get("state_dict") or state).items()
               if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "w.bin")
    assert detect_format(tmp_path / "w.bin") == "checkpoint"
    (tmp_path / "notes.th").write_text("not a checkpoint")
    with pytest.raises(ModelFormatError, match=r"notes\.th: a \.th file that is not a PyTorch checkpoint"):
        detect_format(tmp_path / "notes.th")
    (tmp_path / "x.weird").write_text("hello")
    with pytest.raises(ModelFormatError, match=r"unknown model type \.weird"):
        detect_format(tmp_path / "x.weird")


@pytest.mark.slow
def test_validate_accepts_a_th_checkpoint(sample_model, tmp_path):
    import shutil

    from support.cli import invoke

    shutil.copyfile(sample_model, tmp_path / "resnet20-12fca82f.th")
    result = invoke("validate", "-m", tmp_path / "resnet20-12fca82f.th", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arch"] == "resnet20"


# --- the registry: a new backend = its module + one line ------------------------------------------

class NumpyRunner(Runner):
    """A throwaway backend: logits from the per-channel means of the batch (numpy only)."""

    backend = "numpy"

    def __init__(self, card: ModelCard, facts: ArtifactFacts, *, source: str, scale: float) -> None:
        super().__init__(card, source=source, facts=facts)
        self.weights = np.linspace(-1, 1, 3 * card.num_classes, dtype=np.float32).reshape(3, -1) * scale

    @classmethod
    def open(cls, path: str | Path, *, device: str = "cpu", scale: float = 1.0) -> NumpyRunner:
        card, facts = read_artifact(path)
        return cls(card, facts, source=str(path), scale=scale)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return batch.mean(axis=(2, 3)) @ self.weights


NUMPY_LINE = Backend("test_artifacts:NumpyRunner", ("onnx",))  # the one registry line


def test_a_new_backend_is_its_module_and_one_registry_line(monkeypatch, sample_onnx_fp32, sample_card):
    monkeypatch.setitem(registry.BACKENDS, "numpy", NUMPY_LINE)
    assert registry.readers("onnx") == ("onnxruntime", "openvino", "numpy")
    assert registry.FORMATS["onnx"].readers[0] == "onnxruntime"  # the default stays first
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with open_model(sample_onnx_fp32, backend="numpy", scale=2.0) as runner:
        assert runner.backend == "numpy" and runner.card == sample_card and runner.precision == "fp32"
        np.testing.assert_allclose(runner(batch), batch.mean(axis=(2, 3)) @ runner.weights, rtol=1e-6)
    with pytest.raises(UsageError, match="backend numpy takes no option bogus; its options are: scale"):
        open_model(sample_onnx_fp32, backend="numpy", bogus=1)


def read_card_json(path: Path) -> tuple[ModelCard, ArtifactFacts]:
    """A throwaway format's reader: a file that is only a card."""
    card = ModelCard.from_json(Path(path).read_text())
    return card, ArtifactFacts("cardjson", inputs=(card_input(card),), outputs=(card_output(card),))


def test_a_new_format_is_its_reader_and_one_registry_line(monkeypatch, sample_card, tmp_path):
    """`read_artifact` and `toolkit info` read a format through the reader its `FORMATS` entry names."""
    line = registry.ArtifactFormat("cardjson", (".cardjson",), facts_reader="test_artifacts:read_card_json")
    monkeypatch.setitem(registry.FORMATS, "cardjson", line)
    path = tmp_path / "m.cardjson"
    path.write_text(sample_card.to_json())
    card, facts = read_artifact(path)
    assert card == sample_card and facts.format == "cardjson"
    assert facts.inputs[0].shape == ("batch", *sample_card.input_size)
    info = describe_artifact(path)
    assert info["format"] == "cardjson" and info["size_bytes"] == path.stat().st_size
    monkeypatch.setitem(registry.FORMATS, "cardjson", registry.ArtifactFormat("cardjson", (".cardjson",)))
    with pytest.raises(ModelFormatError, match="cardjson artifacts carry no facts"):
        read_artifact(path)


def test_every_format_with_files_names_a_reader_that_exists():
    for fmt in registry.FORMATS.values():
        if fmt.suffixes:
            assert fmt.facts_reader is not None, fmt.name
            assert callable(registry._imported(fmt.facts_reader)), fmt.facts_reader


def test_require_checkpoint_is_the_one_check_and_names_every_suffix(sample_model, sample_onnx_fp32):
    assert registry.require_checkpoint(str(sample_model), doing="toolkit export") == sample_model
    with pytest.raises(UsageError) as info:
        registry.require_checkpoint(sample_onnx_fp32, doing="toolkit validate")
    message = str(info.value)
    assert message.startswith("`toolkit validate` needs a training checkpoint (")
    assert all(suffix in message for suffix in registry.FORMATS["checkpoint"].suffixes)
    assert f"{sample_onnx_fp32} is an onnx artifact: use `toolkit info` or `toolkit eval` on it" in message


@pytest.mark.slow
def test_the_cli_offers_the_registry_backends(sample_onnx_fp32):
    """In a fresh process the registry line alone makes `--backend numpy` work on the command line."""
    from toolkit.cli import BackendName

    assert [b.value for b in BackendName] == ["auto", *registry.BACKENDS]
    code = (
        "import sys\n"
        "from toolkit.runtime import registry\n"
        "registry.BACKENDS['numpy'] = registry.Backend('test_artifacts:NumpyRunner', ('onnx',))\n"
        "from toolkit.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    image = Path(registry.__file__).parents[1] / "sample" / "images" / "digit_2.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, "predict", "-m", str(sample_onnx_fp32), "--backend",
                           "numpy", str(image), "--format", "json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["top"][0]["class"] in registry_card_classes(sample_onnx_fp32)


def registry_card_classes(path: Path) -> tuple[str, ...]:
    return read_artifact(path)[0].class_names


@pytest.mark.parametrize(("backend", "option"), [("onnxruntime", "hint"), ("openvino", "threads"),
                                                 ("torch", "hint")])
def test_unknown_options_are_refused_by_name(sample_onnx_fp32, sample_model, backend, option):
    model = sample_model if backend == "torch" else sample_onnx_fp32
    with pytest.raises(UsageError, match=f"backend {backend} takes no option {option}; its options are: "):
        open_model(model, backend=backend, **{option: 1})


def test_every_registered_backend_implements_open_with_named_options():
    import inspect

    for name in registry.BACKENDS:
        cls = registry.backend_class(name)  # refuses a class that does not implement open()
        params = inspect.signature(cls.open).parameters.values()
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), f"{name} swallows **options"
    monkey = Backend("toolkit.runtime.base:Runner", ("onnx",))
    registry.BACKENDS["broken"] = monkey
    try:
        with pytest.raises(TypeError, match="must be a Runner that implements open"):
            registry.backend_class("broken")
    finally:
        del registry.BACKENDS["broken"]
