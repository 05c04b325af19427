"""AOTInductor packages (`--format aoti`): verified at export, the same predictions as eager PyTorch,
served through the official tritonclient, their facts shown by `info`, and refused in one line where
they cannot run (another torch, another device, another CPU ISA, no C++ compiler at export).

Compiling takes tens of seconds on two cores, so two packages are built per run: the bundled CIFAR
ResNet-20 (dynamic batch 1..32) and an ImageNet-stem ResNet-18 at 64x64 with a static batch of 4
(which the runner pads).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.pipeline import run_export
from support.cli import invoke
from test_export_pt2 import (
    IMAGENET_SIZE,
    assert_same_predictions_as_eager,
    assert_served_through_tritonclient,
    checkpoint_copy,
    edit_facts,
    imagenet_checkpoint,
)
from toolkit.errors import BackendUnavailableError, ModelFormatError, UsageError
from toolkit.pt2_archive import read_pt2
from toolkit.runtime.registry import detect_format, open_model

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow
if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("AOTInductor needs a C++ compiler", allow_module_level=True)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory, sample_model):
    return checkpoint_copy(sample_model, tmp_path_factory.mktemp("aoti_cifar"))


@pytest.fixture(scope="module")
def cifar_aoti(cifar):
    result = run_export(cifar, "aoti").check()
    assert result.verify is not None and result.verify.max_abs_diff <= 1e-4
    return result.path


@pytest.fixture(scope="module")
def imagenet_aoti(tmp_path_factory):
    checkpoint = imagenet_checkpoint(tmp_path_factory.mktemp("aoti_imagenet"))
    result = run_export(checkpoint, "aoti", dynamic=False, batch_size=4, verify_samples=96).check()
    return checkpoint, result.path


def test_cifar_package_is_verified_named_and_predicts_as_eager(cifar, cifar_aoti, sample_test):
    from toolkit.runtime.aoti_runner import AOTInductorRunner

    assert cifar_aoti.name == "resnet20_digits.aoti.pt2" and detect_format(cifar_aoti) == "aoti"
    with open_model(cifar_aoti) as runner:
        assert isinstance(runner, AOTInductorRunner)
        assert runner.max_batch_size == 32 and runner.fixed_batch_size is None
        batch = np.zeros((70, 3, 32, 32), np.float32)  # beyond the range: split into 32 + 32 + 6
        assert runner(batch).shape == (70, 10)
    assert_same_predictions_as_eager(cifar_aoti, cifar, sample_test)


def test_imagenet_stem_static_package_pads_and_predicts_as_eager(imagenet_aoti, sample_test):
    checkpoint, package = imagenet_aoti
    card, facts = read_pt2(package)
    assert card.input_size == (3, IMAGENET_SIZE, IMAGENET_SIZE)
    assert facts.profile == {"min": 4, "max": 4} and facts.inputs[0].shape == (4, 3, 64, 64)
    with open_model(package) as runner:
        assert runner.fixed_batch_size == 4
    assert_same_predictions_as_eager(package, checkpoint, sample_test.subset(96))  # 50 = 12 x 4 + 2 padded


def test_package_serves_through_tritonclient(cifar_aoti):
    assert_served_through_tritonclient(cifar_aoti)


def test_info_shows_what_the_package_depends_on(cifar_aoti):
    result = invoke("info", "-m", cifar_aoti, "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["format"] == "aoti" and described["precision"] == "fp32"
    assert described["torch_version"] == torch.__version__ and described["device"] == "cpu"
    assert described["cpu_isa"] and described["profile"] == {"min": 1, "max": 32}
    assert described["exporter"].startswith("AOTInductor")
    table = invoke("info", "-m", cifar_aoti)
    assert "aoti" in table.output and torch.__version__ in table.output


# --- refusals: one line saying to rebuild, checked before the library is loaded -------------------

def test_another_torch_release_is_told_to_rebuild(cifar_aoti, tmp_path):
    edited = edit_facts(cifar_aoti, tmp_path / "old.aoti.pt2", torch_version="2.9.0+cpu")
    with pytest.raises(ModelFormatError, match=r"compiled by torch 2\.9\.0\+cpu.*rebuild it here"):
        open_model(edited)
    result = invoke("eval", "-m", edited, "--dataset", "sample", "--limit", "8")
    assert result.exit_code == 1 and "rebuild it here" in result.output
    # another build of the same release links the same ABI: accepted
    same = edit_facts(cifar_aoti, tmp_path / "same.aoti.pt2",
                      torch_version=torch.__version__.split("+")[0] + "+cpu")
    with open_model(same) as runner:
        assert runner(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


def test_another_device_is_told_to_rebuild(cifar_aoti, tmp_path):
    edited = edit_facts(cifar_aoti, tmp_path / "gpu.aoti.pt2", device="cuda")
    with pytest.raises(ModelFormatError, match=r"compiled for cuda and runs only there \(--device cuda\)"):
        open_model(edited)
    if not torch.cuda.is_available():  # a CPU package asked to run on a GPU
        return
    with pytest.raises(ModelFormatError, match="compiled for cpu"):
        open_model(cifar_aoti, device="cuda")


def test_another_cpu_isa_is_told_to_rebuild(cifar_aoti, tmp_path):
    edited = edit_facts(cifar_aoti, tmp_path / "isa.aoti.pt2", cpu_isa="sve256")
    with pytest.raises(ModelFormatError, match="compiled for CPUs with sve256"):
        open_model(edited)


def test_a_package_runs_only_at_its_own_precision(cifar_aoti):
    with pytest.raises(UsageError, match="compiled at fp32; for bf16, export one with --format aoti "
                                         "--precision bf16"):
        open_model(cifar_aoti, precision="bf16")


def test_no_cpp_compiler_is_one_line_before_any_work(cifar, tmp_path):
    from torch._inductor import config

    with config.patch({"cpp.cxx": (None, "no-such-c++")}):  # what inductor searches: $CXX, else g++
        with pytest.raises(BackendUnavailableError, match=r"needs a C\+\+ compiler.*no-such-c\+\+"):
            run_export(cifar, "aoti", tmp_path / "x.aoti.pt2")
        result = invoke("export", "-m", cifar, "--format", "aoti", "-o", tmp_path / "y.aoti.pt2")
    assert result.exit_code == 1 and "export --format pt2" in result.output
    assert not list(tmp_path.iterdir())
