"""`toolkit export` and `toolkit info` through Typer's CliRunner: outputs, JSON, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from toolkit.cli import app

runner = CliRunner()


@pytest.fixture
def ckpt(tmp_path, sample_model):
    """A private copy of the sample checkpoint (and its card) so default outputs land in tmp_path."""
    for source in (sample_model, sample_model.with_name(sample_model.name + ".card.json")):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path / sample_model.name


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_export_onnx_default_path_json_and_info(ckpt):
    result = invoke("export", "-m", ckpt, "--format", "onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["path"] == str(ckpt.with_suffix(".onnx"))
    assert report["verify"]["passed"] and report["verify"]["top1_agreement"] == 1.0
    assert report["verify"]["max_abs_diff"] < 1e-4
    info = invoke("info", "-m", ckpt.with_suffix(".onnx"), "--json")
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["format"] == "onnx" and facts["opset"] == 18 and facts["precision"] == "fp32"
    assert facts["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert facts["outputs"][0]["shape"] == ["batch", 10]
    assert facts["card"]["class_names"] == [str(i) for i in range(10)] and facts["size_bytes"] > 0
    human = invoke("info", "-m", ckpt.with_suffix(".onnx"))
    assert human.exit_code == 0 and "opset" in human.output and "resnet20" in human.output


@pytest.mark.slow
def test_export_torchscript_and_int8_default_names(ckpt):
    result = invoke("export", "-m", ckpt, "--format", "torchscript")
    assert result.exit_code == 0, result.output
    assert ckpt.with_suffix(".ts").is_file() and "passed" in result.output
    result = invoke("export", "-m", ckpt, "--precision", "int8", "--calib-dataset", "sample",
                    "--calib-size", "128",
                    "--opset", "17", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == str(ckpt.with_name("resnet20_digits.int8.onnx"))
    assert report["verify"]["accuracy_drop"] <= 0.01
    facts = json.loads(invoke("info", "-m", report["path"], "--json").stdout)
    assert facts["precision"] == "int8" and "method=minmax" in facts["calibration"]


@pytest.mark.slow
def test_static_export_reports_fixed_batch(ckpt, tmp_path):
    out = tmp_path / "static.onnx"
    result = invoke("export", "-m", ckpt, "-o", out, "--static", "--batch-size", "8", "--opset", "17",
                    "--no-verify")
    assert result.exit_code == 0, result.output
    assert "not verified" in result.output
    facts = json.loads(invoke("info", "-m", out, "--json").stdout)
    assert facts["inputs"][0]["shape"] == [8, 3, 32, 32] and facts["opset"] == 17


@pytest.mark.slow
def test_failed_verification_keeps_artifact_aside_and_good_file(ckpt, tmp_path):
    good = tmp_path / "model.onnx"
    good.write_bytes(b"a good artifact from before")
    result = invoke("export", "-m", ckpt, "-o", good, "--opset", "17", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1
    assert "verification failed" in result.output and "model.failed-verify.onnx" in result.output
    assert good.read_bytes() == b"a good artifact from before"
    assert (tmp_path / "model.failed-verify.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--precision", "int8"], 2, "calib"),
    (["--opset", "99"], 2, "opset 99"),
    (["--format", "torchscript", "--precision", "int8"], 2, "supports precision fp32, fp16, not int8"),
    (["--format", "onnx", "--precision", "bf16"], 2, "supports precision fp32, fp16, int8, not bf16"),
    (["--format", "nonsense"], 2, "nonsense"),
])
def test_bad_options(ckpt, args, code, message):
    result = invoke("export", "-m", ckpt, *args)
    assert result.exit_code == code and message in result.output
    assert sorted(p.name for p in ckpt.parent.iterdir()) == sorted([ckpt.name, ckpt.name + ".card.json"])


def test_unwritable_output_is_one_line(ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("export", "-m", ckpt, "-o", blocker / "model.onnx")
    assert result.exit_code == 1 and "cannot write" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_non_resnet_checkpoint(tmp_path):
    import torch

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    result = invoke("export", "-m", tmp_path / "mlp.pt")
    assert result.exit_code == 1 and "ResNet" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


def test_exported_artifact_is_not_a_checkpoint(sample_onnx_fp32):
    result = invoke("export", "-m", sample_onnx_fp32)
    assert result.exit_code == 2 and "checkpoint" in result.output


def test_info_on_corrupt_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not onnx")
    result = invoke("info", "-m", bad)
    assert result.exit_code == 1 and "not a readable ONNX" in result.output
    assert "Traceback" not in result.output


def test_info_on_checkpoint_and_torchscript(ckpt):
    facts = json.loads(invoke("info", "-m", ckpt, "--json").stdout)
    assert facts["format"] == "checkpoint" and facts["card"]["arch"] == "resnet20"


@pytest.mark.slow
def test_torchscript_fp16_from_the_cli_is_verified_by_accuracy(ckpt, tmp_path):
    """`--format torchscript --precision fp16` (the README's example): fp16 inside, judged by McNemar."""
    out = tmp_path / "half.ts"
    result = invoke("export", "-m", ckpt, "--format", "torchscript", "--precision", "fp16", "-o", out,
                    "--calib-dataset", "sample", "--json")
    assert result.exit_code == 0, result.output
    verify = json.loads(result.stdout)["verify"]
    assert verify["passed"] and verify["mcnemar"] is not None
    info = json.loads(invoke("info", "-m", out, "--json").stdout)
    assert info["precision"] == "fp16"
