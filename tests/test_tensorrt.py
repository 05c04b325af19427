"""TensorRT: engines from the exported ONNX, checked against ONNX Runtime on the sample digits.

The build and parity tests need the tensorrt package, cuda-python and an NVIDIA GPU; elsewhere they
skip with the reason the toolkit itself gives. Without them, the error a user sees must be one
clear line, for export and for opening an engine alike; those tests run on CPU machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fakes.tensorrt as fake_trt
from toolkit.artifacts import ArtifactFacts, facts_path, write_engine_sidecars
from toolkit.card import load_sidecar
from toolkit.errors import BackendUnavailableError, ModelFormatError, UsageError
from toolkit.runtime import open_model
from toolkit.runtime.registry import read_artifact
from toolkit.runtime.tensorrt_runner import (
    TensorRTEnvironment,
    TensorRTRunner,
    check_compatible,
    tensorrt_environment,
)


def _environment_problem() -> str | None:
    try:
        tensorrt_environment("cuda")
    except BackendUnavailableError as exc:
        return str(exc)
    return None


PROBLEM = _environment_problem()


def needs_tensorrt(test):
    """gpu + tensorrt markers, skipped with the toolkit's own reason where either is missing."""
    for mark in (pytest.mark.gpu, pytest.mark.tensorrt,
                 pytest.mark.skipif(PROBLEM is not None, reason=f"no TensorRT here: {PROBLEM}")):
        test = mark(test)
    return test


without_tensorrt = pytest.mark.skipif(PROBLEM is None, reason="TensorRT and a GPU are present")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, sample_model) -> dict[str, Path]:
    """fp32 and fp16 ONNX of the sample model, through export.onnx as `toolkit export` makes them."""
    from export.onnx import export as onnx_export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    folder = tmp_path_factory.mktemp("trt_onnx")
    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    files = {"fp32": onnx_export(model, card, folder / "fp32.onnx", opset=17)}
    if PROBLEM is None:  # fp16 is only needed where an engine can be built
        files["fp16"] = onnx_export(model, card, folder / "fp16.onnx", opset=17, precision="fp16")
    return files


def _fake_engine(folder: Path, card, **facts) -> Path:
    engine = folder / "model.engine"
    engine.write_bytes(b"\x00not an engine")
    facts = ArtifactFacts("tensorrt", tensorrt_version="10.9.0", compute_capability="9.0", gpu="NVIDIA H100",
                          **facts)
    write_engine_sidecars(engine, card, facts)
    return engine


# --- everywhere -------------------------------------------------------------------------------

def test_modules_do_not_import_torch():
    code = ("import sys, toolkit.runtime.tensorrt_runner, export.tensorrt, export.triton; "
            "print(sorted(m for m in ('torch', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_engine_without_card_says_how_to_regenerate(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00")
    with pytest.raises(ModelFormatError, match=r"model\.engine\.card\.json is missing.*--format tensorrt"):
        TensorRTRunner.open(engine)


def test_missing_engine_file(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        TensorRTRunner.open(tmp_path / "absent.engine")


def test_mismatched_engine_asks_for_rebuild(sample_card, tmp_path):
    _, facts = read_artifact(_fake_engine(tmp_path, sample_card))
    here = TensorRTEnvironment(trt=None, cudart=None, version="10.9.0", device_index=0, gpu_name="NVIDIA L4",
                               compute_capability="8.9")
    expected = r"compute capability 9\.0 \(NVIDIA H100\).*NVIDIA L4.*rebuild"
    with pytest.raises(ModelFormatError, match=expected):
        check_compatible(facts, here, tmp_path / "model.engine")
    newer = TensorRTEnvironment(None, None, "11.1.0", 0, "NVIDIA H100", "9.0")
    with pytest.raises(ModelFormatError, match=r"TensorRT 10\.9\.0.*TensorRT 11\.1\.0.*rebuild the engine"):
        check_compatible(facts, newer, tmp_path / "model.engine")
    check_compatible(facts, TensorRTEnvironment(None, None, "10.9.0", 0, "NVIDIA H100", "9.0"), tmp_path)


@pytest.mark.parametrize("batches", [(0, 1, 8), (4, 2, 8), (1, 16, 8)])
def test_bad_profile_is_a_usage_error(onnx_files, sample_card, tmp_path, batches):
    from export.tensorrt import export

    low, opt, high = batches
    with pytest.raises(UsageError, match="min <= opt <= max"):
        export(onnx_files["fp32"], tmp_path / "m.engine", sample_card, min_batch=low, opt_batch=opt,
               max_batch=high)


@without_tensorrt
def test_export_without_tensorrt_is_one_clear_line(onnx_files, sample_card, tmp_path):
    from export.tensorrt import export

    with pytest.raises(BackendUnavailableError) as info:
        export(onnx_files["fp32"], tmp_path / "m.engine", sample_card)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TensorRT export needs ")
    assert "NVIDIA GPU" in message and "pip install 'resnet-toolkit[tensorrt]'" in message
    assert not any(tmp_path.iterdir())  # no engine, no sidecar, no temporary


@without_tensorrt
def test_runner_without_tensorrt_is_one_clear_line(sample_card, tmp_path):
    engine = _fake_engine(tmp_path, sample_card)
    for opener in (TensorRTRunner.open, open_model):
        with pytest.raises(BackendUnavailableError) as info:
            opener(engine)
        assert "\n" not in str(info.value)
        assert str(info.value).startswith("running a TensorRT engine needs ")
        assert "NVIDIA GPU" in str(info.value)


# --- on a GPU with TensorRT -------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(onnx_files, sample_card, sample_test):
    """ONNX Runtime (CPU) logits of the fp32 ONNX: the parity reference for the engines."""
    batch = np.concatenate(list(sample_test.subset(101).batches(sample_card, 64)))
    with open_model(onnx_files["fp32"], backend="onnxruntime", device="cpu") as runner:
        return batch, runner(batch)


@pytest.fixture(scope="module")
def fp32_engine(onnx_files, sample_card, tmp_path_factory):
    from export.tensorrt import export

    folder = tmp_path_factory.mktemp("engines")
    return export(onnx_files["fp32"], folder / "fp32.engine", sample_card, min_batch=1, opt_batch=16,
                  max_batch=32, workspace_gb=1, timing_cache=folder / "timing.cache")


@needs_tensorrt
def test_fp32_engine_matches_onnxruntime(fp32_engine, reference):
    batch, expected = reference
    with open_model(fp32_engine, device="cuda") as runner:
        assert isinstance(runner, TensorRTRunner)
        assert runner.max_batch_size == 32  # 101 images run as 32+32+32+5 through the base Runner
        got = runner(batch)
        single = runner(batch[:1])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(single, expected[:1], rtol=1e-3, atol=1e-3)


@needs_tensorrt
def test_sidecar_records_engine_facts(fp32_engine, onnx_files, sample_card):
    card, facts = read_artifact(fp32_engine)
    env = tensorrt_environment("cuda")
    assert card == load_sidecar(fp32_engine) and "tensorrt" not in card.extra
    assert card.class_names == sample_card.class_names and card.input_size == sample_card.input_size
    assert facts.tensorrt_version == env.version and facts.compute_capability == env.compute_capability
    assert facts.gpu == env.gpu_name and facts.precision == "fp32" and facts.extra["strongly_typed"]
    assert facts.profile == {"min": 1, "opt": 16, "max": 32}
    assert facts.inputs[0].shape == (-1, *sample_card.input_size)
    # nothing glued in front: the file is exactly what TensorRT serialized
    runtime = env.trt.Runtime(env.trt.Logger(env.trt.Logger.ERROR))
    assert runtime.deserialize_cuda_engine(fp32_engine.read_bytes()) is not None
    cache = fp32_engine.parent / "timing.cache"
    assert cache.is_file() and cache.stat().st_size > 0


@needs_tensorrt
def test_fp16_engine_agrees_on_top1(onnx_files, reference, sample_card, tmp_path):
    from export.tensorrt import export

    engine = export(onnx_files["fp16"], tmp_path / "fp16.plan", sample_card, max_batch=64, workspace_gb=1,
                    timing_cache=tmp_path / "timing.cache")
    assert read_artifact(engine)[1].precision == "fp16"
    batch, expected = reference
    with TensorRTRunner.open(engine) as runner:
        assert runner.precision == "fp16"
        got = runner(batch)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert np.abs(got - expected).max() < 0.1


@needs_tensorrt
def test_profile_min_above_batch_is_padded(onnx_files, reference, sample_card, tmp_path):
    from export.tensorrt import export

    engine = export(onnx_files["fp32"], tmp_path / "min4.engine", sample_card, min_batch=4, max_batch=8,
                    workspace_gb=1)
    batch, expected = reference
    with TensorRTRunner.open(engine) as runner:
        got = runner(batch[:3])  # below the profile's min: padded to 4, 3 returned
    assert got.shape == (3, sample_card.num_classes)
    np.testing.assert_allclose(got, expected[:3], rtol=1e-3, atol=1e-3)


@needs_tensorrt
def test_foreign_or_corrupt_engine_asks_for_rebuild(fp32_engine, sample_card, tmp_path):
    card, facts = read_artifact(fp32_engine)
    foreign = tmp_path / "foreign.engine"
    foreign.write_bytes(fp32_engine.read_bytes())
    write_engine_sidecars(foreign, card, facts.replace(tensorrt_version="9.9.9"))
    with pytest.raises(ModelFormatError, match="rebuild the engine on this GPU/TensorRT"):
        TensorRTRunner.open(foreign)
    corrupt = tmp_path / "corrupt.engine"
    corrupt.write_bytes(fp32_engine.read_bytes()[: 1000])
    write_engine_sidecars(corrupt, card, facts)
    with pytest.raises(ModelFormatError, match=r"could not deserialize.*rebuild"):
        TensorRTRunner.open(corrupt)


@needs_tensorrt
def test_triton_plan_repository_runs(fp32_engine, reference, sample_card, tmp_path):
    from export import triton

    model_dir = triton.export(fp32_engine, tmp_path / "repo", sample_card, name="digits_trt",
                              max_batch_size=32)
    batch, expected = reference
    with open_model(model_dir, device="cuda") as runner:
        assert isinstance(runner, TensorRTRunner)
        np.testing.assert_allclose(runner(batch), expected, rtol=1e-3, atol=1e-3)


# --- everywhere: the same plumbing against the simulated TensorRT of tests/fakes/tensorrt.py -------

@pytest.fixture
def simulated_tensorrt(monkeypatch):
    return fake_trt.install(monkeypatch)


def test_simulated_build_run_and_triton(simulated_tensorrt, onnx_files, sample_card, sample_test, tmp_path):
    from export import triton
    from export.tensorrt import export

    trt, cudart = simulated_tensorrt
    cache = tmp_path / "timing.cache"
    engine = export(onnx_files["fp32"], tmp_path / "m.engine", sample_card, min_batch=2, opt_batch=8,
                    max_batch=16, workspace_gb=0.5, timing_cache=cache)
    built = trt.built[-1]
    assert built["network_flags"] == 1  # strongly typed on TensorRT 10
    assert built["workspace"] == 1 << 29 and built["flags_cleared"] == ["tf32"]
    assert cache.read_bytes() == b"timings"
    card, facts = read_artifact(engine)
    assert card == sample_card.replace(toolkit_version=card.toolkit_version) and "tensorrt" not in card.extra
    assert facts.gpu == "Simulated GPU" and facts.compute_capability == "9.0"
    assert facts.tensorrt_version == "10.9.0"
    assert facts.profile == {"min": 2, "opt": 8, "max": 16} and facts.precision == "fp32"
    assert facts.inputs[0].shape == (-1, 3, 32, 32) and facts.inputs[0].dtype == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.engine", "m.engine.card.json", "m.engine.facts.json", "timing.cache"]

    batch = np.concatenate(list(sample_test.subset(37).batches(sample_card, 37)))
    with open_model(onnx_files["fp32"]) as source:
        expected = source(batch)
    with open_model(engine, device="cuda") as runner:
        assert isinstance(runner, TensorRTRunner) and runner.max_batch_size == 16
        np.testing.assert_allclose(runner(batch), expected, atol=1e-5)
        np.testing.assert_allclose(runner(batch[:1]), expected[:1], atol=1e-5)  # padded to the profile's min
        # the warm-up at load (one image, padded to the profile's min 2), then 37 as 16 + 16 + 5, then 1 -> 2
        assert trt.engines[-1].calls == [2, 16, 16, 5, 2]
        assert runner.describe()["gpu"] == "Simulated GPU"
    assert not cudart.buffers  # close() freed device and pinned memory

    model_dir = triton.export(engine, tmp_path / "repo", sample_card, name="digits_trt", max_batch_size=16)
    assert facts_path(model_dir / "1" / "model.plan").is_file()  # the facts travel with the plan
    with open_model(model_dir) as runner:
        np.testing.assert_allclose(runner(batch), expected, atol=1e-5)
        assert runner.facts == facts


def test_simulated_version_mismatch_and_corrupt_engine(simulated_tensorrt, onnx_files, sample_card, tmp_path,
                                                       monkeypatch):
    from export.tensorrt import export

    engine = export(onnx_files["fp32"], tmp_path / "m.plan", sample_card, max_batch=4)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.fake_tensorrt("11.0.0"))
    expected = r"built with TensorRT 10\.9\.0.*this machine has TensorRT 11\.0\.0"
    with pytest.raises(ModelFormatError, match=expected):
        open_model(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", simulated_tensorrt[0])
    engine.write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="could not deserialize"):
        TensorRTRunner.open(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", _module_with_version("8.6.1"))
    with pytest.raises(BackendUnavailableError, match=r"TensorRT >= 10 \(found 8\.6\.1\)"):
        TensorRTRunner.open(engine)


def _module_with_version(version):
    from types import SimpleNamespace

    return SimpleNamespace(__version__=version)


def test_simulated_tensorrt_11_needs_no_typing_flag(simulated_tensorrt, onnx_files, sample_card, tmp_path,
                                                    monkeypatch):
    from export.tensorrt import export

    trt11 = fake_trt.fake_tensorrt("11.2.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt11)
    engine = export(onnx_files["fp32"], tmp_path / "m.engine", sample_card, max_batch=4)
    assert trt11.built[-1]["network_flags"] == 0  # strongly typed is the only mode in TensorRT 11
    assert read_artifact(engine)[1].tensorrt_version == "11.2.0"


@without_tensorrt
def test_cli_tensorrt_export_without_tensorrt(sample_model, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    result = CliRunner().invoke(app, ["export", "-m", str(sample_model), "--format", "tensorrt",
                                      "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "TensorRT export needs" in lines[0] and "NVIDIA GPU" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_simulated_pipeline_formats(simulated_tensorrt, sample_model, sample_card, tmp_path):
    """`--format tensorrt` and `--format triton` (plan) through run_export, verified against PyTorch."""
    from export.pipeline import run_export

    engine = run_export(sample_model, "tensorrt", tmp_path / "m.engine", opset=17, verify_samples=64,
                        max_batch=16)
    assert engine.ok, engine.verify.failures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.card.json",
                                                          "m.engine.facts.json"]
    assert read_artifact(tmp_path / "m.engine")[1].profile["max"] == 16
    repo = run_export(sample_model, "triton", tmp_path / "repo", opset=17, verify_samples=64,
                      model_format="tensorrt", max_batch=8, name="digits_trt")
    assert repo.ok, repo.verify.failures
    assert (tmp_path / "repo" / "digits_trt" / "1" / "model.plan").is_file()
    config = (tmp_path / "repo" / "digits_trt" / "config.pbtxt").read_text("utf-8")
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 8" in config and "KIND_GPU" in config
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.engine", "m.engine.card.json", "m.engine.facts.json", "repo"]


def test_info_reads_engine_facts_of_an_older_engine_without_tensorrt(tmp_path, sample_card):
    """`toolkit info` on an engine needs no GPU; an engine written before the facts sidecar kept them in
    its card's extra["tensorrt"], and still reads (the card given back no longer holds them)."""
    from toolkit.card import sidecar_path
    from toolkit.describe import describe_artifact

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\x00" * 64)
    facts = {"version": "10.9.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "precision": "fp16",
             "profile": {"min": 1, "opt": 8, "max": 32}}
    sample_card.replace(extra={"tensorrt": facts}).save(sidecar_path(engine))
    info = describe_artifact(engine)
    assert (info["tensorrt_version"], info["gpu"], info["compute_capability"], info["precision"]) == (
        "10.9.0", "NVIDIA H100", "9.0", "fp16")
    assert info["profile"] == {"min": 1, "opt": 8, "max": 32} and "tensorrt" not in info["card"]["extra"]
