"""`toolkit validate` end to end through the CLI: verdicts, problems, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from toolkit.archs import build_model
from toolkit.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, ["validate", *args])
    assert "Traceback" not in result.output
    return result


def report(*args: str) -> tuple[int, dict]:
    result = invoke(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def codes(data: dict) -> set[str]:
    return {p["code"] for p in data["problems"]}


@pytest.fixture
def trained_state(sample_model):
    return torch.load(sample_model, weights_only=True)


@pytest.mark.slow
def test_sample_model_is_valid_and_reaches_its_accuracy(sample_model):
    code, data = report("-m", str(sample_model), "--dataset", "sample", "--min-accuracy", "0.95")
    assert code == 0 and data["valid"] and not data["problems"]
    facts = (data["arch"], data["num_classes"], data["family"], data["stem"])
    assert facts == ("resnet20", 10, "resnet", "cifar")
    assert data["accuracy"] >= 0.95 and len(data["sha256"]) == 64
    assert data["card"]["class_names"] == [str(i) for i in range(10)]


def test_accuracy_gate_fails_below_threshold(sample_model):
    # all 360 test digits: the sample model gets 359 right, so a 100 % gate must fail
    code, data = report("-m", str(sample_model), "--dataset", "sample", "--min-accuracy", "100")
    assert code == 1 and "accuracy_below_threshold" in codes(data)


@pytest.mark.slow
def test_accuracy_gate_runs_at_the_asked_precision(sample_model):
    """Issue 12: --precision (and --device) reach the gate's runner; the report says what it ran at."""
    code, data = report("-m", str(sample_model), "--dataset", "sample", "--limit", "200",
                        "--precision", "bf16", "--min-accuracy", "0.9")
    assert code == 0 and data["valid"], data["problems"]
    assert (data["accuracy_precision"], data["accuracy_device"]) == ("bf16", "cpu")
    assert data["accuracy"] >= 0.9 and data["accuracy_samples"] == 200
    code, data = report("-m", str(sample_model), "--dataset", "sample", "--limit", "50")
    assert (data["accuracy_precision"], data["accuracy_device"]) == ("fp32", "cpu")
    code, data = report("-m", str(sample_model), "--dataset", "sample",  # all 360: one is wrong
                        "--precision", "bf16", "--min-accuracy", "100")
    failed = [p["message"] for p in data["problems"] if p["code"] == "accuracy_below_threshold"]
    assert code == 1 and "(bf16 on cpu)" in failed[0]
    human = invoke("-m", str(sample_model), "--dataset", "sample", "--limit", "50", "--precision", "bf16")
    assert human.exit_code == 0 and "(bf16 on cpu)" in " ".join(human.stdout.split())  # however it wraps


@pytest.mark.parametrize("args", [["--precision", "bf16"], ["--device", "cuda"], ["--precision", "int8"],
                                  ["--dataset", "sample", "--device", "gpu"]])
def test_gate_options_without_a_measurement_or_unknown_are_usage_errors(sample_model, args):
    result = invoke("-m", str(sample_model), *args)
    assert result.exit_code == 2, result.output


def test_human_summary_names_architecture(sample_model):
    result = invoke("-m", str(sample_model))
    assert result.exit_code == 0
    assert "VALID" in result.stdout and "resnet20" in result.stdout and "no problems found" in result.stdout


WRAPPED_CASES = [(arch, shortcut, wrapper)
                 for arch, shortcut in (("resnet20", "B"), ("resnext29_32x4d", None), ("resnet18", None))
                 for wrapper in ("plain", "lightning", "dataparallel", "safetensors")]
# ImageNet-stem bottleneck nets end to end too (224x224 forward pass), in one wrapper each.
WRAPPED_CASES += [pytest.param("resnet50", None, "dataparallel", marks=pytest.mark.slow),
                  pytest.param("resnext50_32x4d", None, "lightning", marks=pytest.mark.slow)]


@pytest.mark.slow
@pytest.mark.parametrize("arch, shortcut, wrapper", WRAPPED_CASES)
def test_real_weights_in_wrappers_end_to_end(tmp_path, arch, shortcut, wrapper):
    model = build_model(arch, 10, shortcut=shortcut)
    for module in model.modules():  # pretend it was trained: non-default BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    if wrapper == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "w.ckpt"
        saved = {"plain": state, "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
                 "dataparallel": {f"module.{k}": v for k, v in state.items()}}[wrapper]
        torch.save(saved, path)
    code, data = report("-m", str(path))
    assert code == 0, data["problems"]
    assert (data["arch"], data["num_classes"]) == (arch, 10)


def test_nan_weights(tmp_path, trained_state):
    trained_state["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(trained_state, tmp_path / "nan.pt")
    code, data = report("-m", str(tmp_path / "nan.pt"))
    assert code == 1 and not data["valid"]
    assert "non_finite" in codes(data) and "layer2.1.conv1.weight" in json.dumps(data["problems"])


def test_untrained_batchnorm(tmp_path):
    torch.save(build_model("resnet20", 10).state_dict(), tmp_path / "fresh.pt")
    code, data = report("-m", str(tmp_path / "fresh.pt"))
    assert code == 1 and "bn_untrained" in codes(data)


def test_nonpositive_running_var_and_dead_layer(tmp_path, trained_state):
    trained_state["bn1.running_var"][3] = -1.0
    trained_state["layer1.0.conv2.weight"].zero_()
    torch.save(trained_state, tmp_path / "bad.pt")
    code, data = report("-m", str(tmp_path / "bad.pt"))
    assert code == 1 and {"bn_running_var", "dead_layer"} <= codes(data)


def test_wrong_head_for_classes(sample_model):
    code, data = report("-m", str(sample_model), "--classes", "cifar100")
    assert code == 1 and "head_mismatch" in codes(data)
    assert "10 outputs" in json.dumps(data["problems"])


def test_missing_and_mismatched_keys_are_listed(tmp_path, trained_state):
    del trained_state["layer3.2.bn2.running_mean"]
    trained_state["layer1.0.conv1.weight"] = torch.randn(16, 16, 5, 5)
    trained_state["extra.weight"] = torch.randn(2)
    torch.save(trained_state, tmp_path / "odd.pt")
    code, data = report("-m", str(tmp_path / "odd.pt"))
    assert code == 1 and {"missing_keys", "unexpected_keys", "shape_mismatch"} <= codes(data)
    text = json.dumps(data["problems"])
    assert "layer3.2.bn2.running_mean" in text and "extra.weight" in text and "[16, 16, 3, 3]" in text


def test_constant_output_is_flagged(tmp_path, trained_state):
    trained_state["fc.weight"].zero_()
    torch.save(trained_state, tmp_path / "const.pt")
    code, data = report("-m", str(tmp_path / "const.pt"))
    assert code == 1 and "constant_output" in codes(data)


def test_truncated_file_is_invalid_without_traceback(tmp_path, sample_model):
    (tmp_path / "cut.pt").write_bytes(sample_model.read_bytes()[:50_000])
    result = invoke("-m", str(tmp_path / "cut.pt"))
    assert result.exit_code == 1 and "truncated or corrupt" in result.stdout


def test_pickled_code_refused_names_the_flag(tmp_path):
    from test_checkpoint import Payload

    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "x": Payload(marker)}, tmp_path / "evil.pt")
    code, data = report("-m", str(tmp_path / "evil.pt"))
    assert code == 1 and "--allow-pickle" in data["problems"][0]["message"] and not marker.exists()


def test_arch_conflict_and_unknown_arch(sample_model):
    code, data = report("-m", str(sample_model), "--arch", "resnet56")
    assert code == 1 and "conflicts" in data["problems"][0]["message"]
    result = invoke("-m", str(sample_model), "--arch", "vgg16")
    assert result.exit_code == 2 and "unknown architecture" in result.stderr


def test_missing_file_and_usage_errors(tmp_path, sample_model):
    result = invoke("-m", str(tmp_path / "nope.pt"))
    assert result.exit_code == 1 and "model not found" in result.stderr
    result = invoke("-m", str(sample_model), "--min-accuracy", "0.9")
    assert result.exit_code == 2 and "--dataset" in result.stderr


def test_write_card_is_picked_up_by_every_command(tmp_path, sample_model):
    from toolkit.card import ModelCard

    path = tmp_path / "m.pt"
    path.write_bytes(sample_model.read_bytes())  # no sidecar: names default to the cifar10 preset
    classes = tmp_path / "names.txt"
    classes.write_text("\n".join(f"digit-{i}" for i in range(10)))
    assert invoke("-m", str(path), "--classes", str(classes), "--write-card").exit_code == 0
    card = ModelCard.load(tmp_path / "m.pt.card.json")
    assert card.class_names[3] == "digit-3" and card.arch == "resnet20"
    code, data = report("-m", str(path))
    assert code == 0 and data["card"]["class_names"][3] == "digit-3"


def test_default_model_from_project_config(tmp_path, sample_model, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(f'[tool.toolkit]\nmodel = "{sample_model}"\n')
    monkeypatch.chdir(tmp_path)
    result = invoke("--json")
    assert result.exit_code == 0 and "project configuration" in result.stderr


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys, toolkit.cli; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(toolkit.cli.app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'torchvision', 'numpy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.stdout.strip() == "[]"
