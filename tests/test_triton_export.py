"""Triton model repository export: config checked against Triton's own ModelConfig schema,
labels from the card, the directory opens with open_model and matches the source ONNX, and a
failed export leaves nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import triton
from toolkit.artifacts import ONNX_CARD_KEY
from toolkit.card import ModelCard, load_sidecar, sidecar_path
from toolkit.errors import ExportError, ModelFormatError, NoSpaceError, UsageError
from toolkit.runtime import open_model

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is in the test extra"
)
from google.protobuf import text_format  # noqa: E402  (after the skip: protobuf comes with tritonclient)


def _export_onnx(sample_model: Path, card, output: Path, dynamic: bool = True) -> Path:
    """The sample model as ONNX through export.onnx (opset 17: the quick legacy exporter)."""
    from export.onnx import export as onnx_export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, built_card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    assert built_card.class_names == card.class_names
    return onnx_export(model, built_card, output, opset=17, dynamic=dynamic, batch_size=4)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, sample_model, sample_card) -> Path:
    return _export_onnx(sample_model, sample_card, tmp_path_factory.mktemp("onnx") / "resnet20.onnx")


def _parse_config(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text("utf-8"), model_config_pb2.ModelConfig())


def _onnx_io(path: Path):
    graph = onnx.load(str(path)).graph
    dims = [[d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            for v in (graph.input[0], graph.output[0])]
    return graph.input[0].name, dims[0], graph.output[0].name, dims[1]


def test_config_matches_onnx_and_triton_schema(onnx_file, sample_card, tmp_path):
    model_dir = triton.export(onnx_file, tmp_path / "repo", sample_card, name="digits", max_batch_size=64,
                              preferred_batch_sizes=[16, 64], max_queue_delay_us=250, instance_count=2)
    assert model_dir == tmp_path / "repo" / "digits"
    config = _parse_config(model_dir)
    in_name, in_dims, out_name, out_dims = _onnx_io(onnx_file)
    assert in_dims[0] == -1 and out_dims[0] == -1  # the ONNX batches dynamically
    assert config.name == "digits"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [
        (in_name, in_dims[1:], model_config_pb2.TYPE_FP32)]
    assert [(o.name, list(o.dims), o.data_type, o.label_filename) for o in config.output] == [
        (out_name, [sample_card.num_classes], model_config_pb2.TYPE_FP32, "labels.txt")]
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, cpu)]
    # the card travels in the config, where Triton's /v2/models/<name>/config hands it to RemoteRunner
    assert ModelCard.from_json(config.parameters["toolkit.card"].string_value) == sample_card
    # labels.txt: the card's class names, one per line, in index order
    assert (model_dir / "labels.txt").read_text("utf-8").splitlines() == list(sample_card.class_names)
    # the model file is the ONNX itself; it carries its card, so no sidecar is added
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert not sidecar_path(model_dir / "1" / "model.onnx").exists()
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["digits"]  # no staging left behind


def test_repository_opens_and_matches_source_onnx(onnx_file, sample_card, sample_test, tmp_path):
    repo = tmp_path / "repo"
    triton.export(onnx_file, repo, sample_card, name="digits")
    batch = next(sample_test.batches(sample_card, 37))  # an odd batch
    with open_model(onnx_file) as source:
        expected = source(batch)
    for target in (repo / "digits", repo):  # a model directory, or a repository holding one model
        with open_model(target) as runner:
            assert runner.card.class_names == sample_card.class_names
            got = runner(batch)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # and the numbers are real predictions: the sample model is accurate on the sample digits
    assert (expected.argmax(1) == sample_test.labels[:37]).mean() > 0.8


def test_no_batching_keeps_full_dims(onnx_file, sample_card, tmp_path):
    model_dir = triton.export(onnx_file, tmp_path, sample_card, name="digits", max_batch_size=0)
    config = _parse_config(model_dir)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, *sample_card.input_size]
    assert not config.HasField("dynamic_batching")  # Triton rejects a batcher without batching


@pytest.mark.slow
def test_static_batch_onnx_needs_max_batch_size_zero(sample_model, sample_card, tmp_path):
    static = _export_onnx(sample_model, sample_card, tmp_path / "static.onnx", dynamic=False)
    with pytest.raises(ExportError, match=r"fixed batch dimension.*--dynamic"):
        triton.export(static, tmp_path / "repo", sample_card, name="digits", max_batch_size=8)
    assert not (tmp_path / "repo" / "digits").exists()
    model_dir = triton.export(static, tmp_path / "repo", sample_card, name="digits", max_batch_size=0)
    config = _parse_config(model_dir)
    assert list(config.input[0].dims) == [4, *sample_card.input_size]


def test_onnx_without_card_gets_sidecar(onnx_file, sample_card, tmp_path):
    proto = onnx.load(str(onnx_file))
    kept = [p for p in proto.metadata_props if p.key != ONNX_CARD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    model_dir = triton.export(bare, tmp_path / "repo", sample_card, name="bare")
    assert load_sidecar(model_dir / "1" / "model.onnx") == sample_card
    with open_model(model_dir) as runner:
        assert runner.card.class_names == sample_card.class_names


def test_failed_export_leaves_nothing_and_keeps_old_model(onnx_file, sample_card, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    old_dir = triton.export(onnx_file, repo, sample_card, name="digits", max_batch_size=8)
    old_config = (old_dir / "config.pbtxt").read_text("utf-8")

    def broken_copy(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton.shutil, "copyfile", broken_copy)
    with pytest.raises(NoSpaceError, match=f"^no space left on {repo}$"):
        triton.export(onnx_file, repo, sample_card, name="digits", max_batch_size=64)
    with pytest.raises(NoSpaceError):
        triton.export(onnx_file, repo, sample_card, name="fresh")
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]  # no partial "fresh", no staging dirs
    assert (old_dir / "config.pbtxt").read_text("utf-8") == old_config  # old model untouched
    monkeypatch.undo()
    triton.export(onnx_file, repo, sample_card, name="digits", max_batch_size=64)  # replaces on success
    assert _parse_config(old_dir).max_batch_size == 64
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]


def _fake_engine(tmp_path: Path, card, max_batch: int = 32) -> Path:
    """An engine file plus the sidecars export.tensorrt writes (engine bytes are opaque to Triton export)."""
    from toolkit.artifacts import ArtifactFacts, TensorFacts, facts_path

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine")
    facts = ArtifactFacts("tensorrt", precision="fp16", tensorrt_version="10.9.0", gpu="NVIDIA H100",
                          compute_capability="9.0", profile={"min": 1, "opt": max_batch, "max": max_batch},
                          inputs=(TensorFacts("images", (-1, *card.input_size), "float32"),),
                          outputs=(TensorFacts("logits", (-1, card.num_classes), "float32"),))
    card.save(sidecar_path(engine))
    facts.save(facts_path(engine))
    return engine


def test_engine_becomes_tensorrt_plan(sample_card, tmp_path):
    engine = _fake_engine(tmp_path, sample_card)
    model_dir = triton.export(engine, tmp_path / "repo", sample_card, name="digits_trt", max_batch_size=32,
                              preferred_batch_sizes=[8, 32])
    config = _parse_config(model_dir)
    assert config.platform == "tensorrt_plan"
    assert [(i.name, list(i.dims)) for i in config.input] == [("images", list(sample_card.input_size))]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", [sample_card.num_classes], "labels.txt")]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    plan = model_dir / "1" / "model.plan"
    assert plan.read_bytes() == engine.read_bytes()
    assert load_sidecar(plan) == load_sidecar(engine)  # the card travels along, and the engine's facts
    from toolkit.artifacts import facts_path

    assert facts_path(plan).read_bytes() == facts_path(engine).read_bytes()
    assert ModelCard.from_json(config.parameters["toolkit.card"].string_value) == load_sidecar(engine)
    with pytest.raises(UsageError, match="profile max batch 32"):
        triton.export(engine, tmp_path / "repo", sample_card, name="too_big", max_batch_size=64)
    with pytest.raises(UsageError, match="KIND_GPU"):
        triton.export(engine, tmp_path / "repo", sample_card, name="cpu_plan", kind="KIND_CPU")
    sidecar_path(engine).unlink()
    with pytest.raises(ModelFormatError, match=r"card .* is missing"):
        triton.export(engine, tmp_path / "repo", sample_card, name="no_card")


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "../escape"}, "model name"),
    ({"name": "ok", "kind": "KIND_TPU"}, "kind must be one of"),
    ({"name": "ok", "max_batch_size": 4, "preferred_batch_sizes": [8]}, "preferred batch sizes"),
    ({"name": "ok", "instance_count": 0}, "instance_count"),
])
def test_bad_options_are_usage_errors(onnx_file, sample_card, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        triton.export(onnx_file, tmp_path / "repo", sample_card, **kwargs)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_not_a_model_file(sample_card, tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(UsageError, match="ONNX file or a TensorRT engine"):
        triton.export(text, tmp_path / "repo", sample_card, name="x")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ModelFormatError):
        triton.export(corrupt, tmp_path / "repo", sample_card, name="x")
    shutil.rmtree(tmp_path / "repo", ignore_errors=True)


@pytest.mark.slow
def test_cli_export_triton_end_to_end(sample_model, sample_card, tmp_path):
    """`toolkit export --format triton -o repo/`: verified against PyTorch, other models kept."""
    from typer.testing import CliRunner

    from export.pipeline import run_export
    from toolkit.cli import app

    repo = tmp_path / "repo"
    first = run_export(sample_model, "triton", repo, opset=17, name="digits_fp16", precision="fp16",
                       verify_samples=64)
    assert first.ok and (repo / "digits_fp16" / "1" / "model.onnx").is_file()
    result = CliRunner().invoke(app, ["export", "-m", str(sample_model), "--format", "triton",
                                      "-o", str(repo), "--opset", "17", "--verify-samples", "64",
                                      "--name", "digits", "--max-batch", "16"])
    assert result.exit_code == 0, result.output
    assert "verify passed" in result.output
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "digits_fp16"]  # both models served
    config = _parse_config(repo / "digits")
    assert config.max_batch_size == 16 and config.output[0].label_filename == "labels.txt"
    labels = (repo / "digits" / "labels.txt").read_text("utf-8").split()
    assert labels == list(sample_card.class_names)
    with open_model(repo / "digits_fp16") as runner:
        assert runner.precision == "fp16"
    assert not [p for p in tmp_path.iterdir() if p.name != "repo"]  # no staging or temporary ONNX left


def test_external_data_travels_with_the_model(onnx_file, sample_card, sample_test, tmp_path):
    """Models over 2 GB keep weights beside the .onnx; the repository must carry those files."""
    proto = onnx.load(str(onnx_file))
    big = tmp_path / "src" / "big.onnx"
    big.parent.mkdir()
    onnx.save_model(proto, str(big), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=1024)
    model_dir = triton.export(big, tmp_path / "repo", sample_card, name="big")
    assert (model_dir / "1" / "big.onnx.data").is_file()
    batch = next(sample_test.batches(sample_card, 8))
    with open_model(onnx_file) as source, open_model(model_dir) as copied:
        np.testing.assert_allclose(copied(batch), source(batch), atol=1e-6)
