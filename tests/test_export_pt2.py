"""torch.export programs (`--format pt2`): verified at export, the same predictions as eager PyTorch, the
card and facts inside the archive, served through the official tritonclient, refused when damaged.

The helpers here (checkpoints, eager predictions, facts editing, a tritonclient round trip) are shared
with tests/test_export_aoti.py.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from export.pipeline import run_export
from support.cli import invoke
from test_export_onnx import random_net
from toolkit.card import sidecar_path
from toolkit.errors import ModelFormatError, UsageError
from toolkit.pt2_archive import read_pt2
from toolkit.runtime.registry import detect_format, open_model

torch = pytest.importorskip("torch")

IMAGENET_ARCH, IMAGENET_SIZE, IMAGENET_CLASSES = "resnet18", 64, 3


# --- shared helpers -------------------------------------------------------------------------------

def checkpoint_copy(sample_model: Path, folder: Path) -> Path:
    """A private copy of the sample CIFAR ResNet-20 checkpoint and its card."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in (sample_model, sidecar_path(sample_model)):
        shutil.copy(source, folder / source.name)
    return folder / sample_model.name


def imagenet_checkpoint(folder: Path) -> Path:
    """The smallest ImageNet-stem net: a random ResNet-18 with 3 classes, its card at 64x64 beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model, card = random_net(IMAGENET_ARCH, IMAGENET_SIZE, classes=IMAGENET_CLASSES)
    path = folder / "resnet18.pt"
    torch.save(model.state_dict(), path)
    card.save(sidecar_path(path))
    return path


def assert_same_predictions_as_eager(artifact: Path, checkpoint: Path, sample_test) -> None:
    """fp32 artifacts evaluate to eager PyTorch's predictions on the sample dataset, image by image."""
    from toolkit.evaluate import collect_logits

    with open_model(checkpoint) as eager, open_model(artifact) as runner:
        ref = collect_logits(eager, sample_test, batch_size=50)  # 50: not a multiple of the batch range
        got = collect_logits(runner, sample_test, batch_size=50)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def edit_facts(package: Path, output: Path, **changes) -> Path:
    """A copy of `package` whose extra/artifact.json has `changes` merged into its "extra" facts."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(output, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/extra/artifact.json"):
                facts = json.loads(data)
                facts["extra"].update(changes)
                data = json.dumps(facts).encode()
            target.writestr(info, data)
    return output


def assert_served_through_tritonclient(artifact: Path) -> None:
    """The artifact behind `toolkit serve`'s server answers tritonclient as the runner answers directly."""
    import tritonclient.http as httpclient

    from support.serve import running_server

    with open_model(artifact) as runner:
        batch = np.random.default_rng(0).standard_normal((3, *runner.card.input_size)).astype(np.float32)
        expected = runner(batch)
        with running_server(runner, max_batch_size=8) as (base, _):
            client = httpclient.InferenceServerClient(base.removeprefix("http://"))
            try:
                assert client.is_model_ready("digits")
                inp = httpclient.InferInput("input", list(batch.shape), "FP32")
                inp.set_data_from_numpy(batch, binary_data=True)
                result = client.infer("digits", [inp])
            finally:
                client.close()
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6, atol=1e-6)


# --- fixtures: one export each, verified by the pipeline as `toolkit export` does ------------------

@pytest.fixture(scope="module")
def cifar(tmp_path_factory, sample_model):
    return checkpoint_copy(sample_model, tmp_path_factory.mktemp("pt2_cifar"))


@pytest.fixture(scope="module")
def cifar_pt2(cifar):
    result = run_export(cifar, "pt2").check()
    assert result.verify is not None and result.verify.max_abs_diff <= 1e-4
    return result.path


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return imagenet_checkpoint(tmp_path_factory.mktemp("pt2_imagenet"))


# --- exporting -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cifar_program_is_verified_named_and_predicts_as_eager(cifar, cifar_pt2, sample_test):
    from toolkit.runtime.pt2_runner import ExportedProgramRunner

    assert cifar_pt2.name == "resnet20_digits.pt2" and detect_format(cifar_pt2) == "pt2"
    with open_model(cifar_pt2) as runner:
        assert isinstance(runner, ExportedProgramRunner)
        assert runner.max_batch_size == 32 and runner.fixed_batch_size is None
    assert_same_predictions_as_eager(cifar_pt2, cifar, sample_test)


@pytest.mark.slow
def test_imagenet_stem_program_with_a_small_batch_range(imagenet, tmp_path, sample_test):
    result = run_export(imagenet, "pt2", tmp_path / "r18.pt2", max_batch=8, verify_samples=96).check()
    card, facts = read_pt2(result.path)
    assert card.input_size == (3, IMAGENET_SIZE, IMAGENET_SIZE) and facts.profile == {"min": 1, "max": 8}
    assert_same_predictions_as_eager(result.path, imagenet, sample_test.subset(96))  # 50s split into 8s


@pytest.mark.slow
def test_static_program_pads_smaller_batches(cifar, tmp_path):
    result = run_export(cifar, "pt2", tmp_path / "static.pt2", dynamic=False, batch_size=4,
                        verify_samples=64).check()
    _, facts = read_pt2(result.path)
    assert facts.profile == {"min": 4, "max": 4} and facts.inputs[0].shape[0] == 4
    batch = np.random.default_rng(3).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with open_model(result.path) as runner, open_model(cifar) as eager:
        assert runner.fixed_batch_size == 4
        np.testing.assert_allclose(runner(batch), eager(batch), atol=1e-4, rtol=1e-3)  # 4 + 3 padded
        np.testing.assert_allclose(runner(batch[:1]), eager(batch[:1]), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_reduced_precision_program_is_judged_by_agreement(cifar, tmp_path, precision):
    """(fp16 is slow on CPUs: torch emulates most fp16 kernels there.)"""
    result = run_export(cifar, "pt2", tmp_path / f"m.{precision}.pt2", precision=precision,
                        verify_samples=128).check()
    report = result.verify
    assert report is not None and report.top1_agreement >= 0.99
    assert 0 < report.max_abs_diff < 1.0  # really ran at reduced precision, and close
    _, facts = read_pt2(result.path)
    assert facts.precision == precision
    with open_model(result.path) as runner:
        assert runner.precision == precision
    other = "fp16" if precision == "bf16" else "bf16"
    with pytest.raises(UsageError, match=f"is a {precision} torch.export artifact"):
        open_model(result.path, precision=other)


@pytest.mark.slow
def test_fp32_program_runs_at_bf16_when_asked(cifar_pt2, cifar):
    batch = np.random.default_rng(4).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with open_model(cifar_pt2, precision="bf16") as runner, open_model(cifar) as eager:
        assert runner.precision == "bf16"
        diff = np.abs(runner(batch) - eager(batch)).max()
    assert 0 < diff < 1.0


def test_program_exported_on_another_device_is_moved_to_this_one(cifar_pt2, cifar, tmp_path):
    """A program exported with --device cuda holds cuda tensors and device arguments: the runner moves
    them (torch.export.passes.move_to_device_pass). Simulated by the facts; moving cpu -> cpu is exact."""
    moved = edit_facts(cifar_pt2, tmp_path / "moved.pt2", device="cuda")
    batch = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with open_model(moved) as runner, open_model(cifar) as eager:
        np.testing.assert_allclose(runner(batch), eager(batch), atol=1e-4, rtol=1e-3)


def test_batch_options_are_checked_and_refused_in_one_line(cifar, tmp_path):
    with pytest.raises(UsageError, match="--max-batch must be >= 1"):
        run_export(cifar, "pt2", tmp_path / "a.pt2", max_batch=0)
    with pytest.raises(UsageError, match="--static fixes the batch"):
        run_export(cifar, "pt2", tmp_path / "b.pt2", dynamic=False, batch_size=2, max_batch=8)
    with pytest.raises(UsageError, match="does not take workspace_gb"):
        run_export(cifar, "pt2", tmp_path / "c.pt2", workspace_gb=1.0)
    with pytest.raises(UsageError, match="supports precision fp32, fp16, bf16, not int8"):
        run_export(cifar, "pt2", tmp_path / "d.pt2", precision="int8", calib_dataset="sample")
    assert not list(tmp_path.glob("*.pt2"))


@pytest.mark.slow
def test_cli_export_and_info(cifar, tmp_path):
    output = tmp_path / "cli.pt2"
    result = invoke("export", "-m", cifar, "--format", "pt2", "-o", output, "--max-batch", "16",
                    "--verify-samples", "64")
    assert result.exit_code == 0, result.output
    assert "verify passed" in result.output and "Warning" not in result.output
    info = invoke("info", "-m", output, "--json")
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["format"] == "pt2" and described["precision"] == "fp32"
    assert described["profile"] == {"min": 1, "max": 16}
    assert described["torch_version"] == torch.__version__ and described["card"]["arch"] == "resnet20"
    table = invoke("info", "-m", output)
    assert "pt2" in table.output and "torch.export" in table.output


# --- serving ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_program_serves_through_tritonclient(cifar_pt2):
    assert_served_through_tritonclient(cifar_pt2)


# --- reading: the content decides, damage is one line ---------------------------------------------

@pytest.mark.slow
def test_card_and_facts_live_in_the_archive_and_read_without_torch(cifar_pt2):
    with zipfile.ZipFile(cifar_pt2) as archive:
        names = archive.namelist()
    assert any(n.endswith("/extra/card.json") for n in names)
    assert any(n.endswith("/extra/artifact.json") for n in names)
    card, facts = read_pt2(cifar_pt2)
    assert card.arch == "resnet20" and facts.format == "pt2"
    assert facts.inputs[0].shape == ("batch", 3, 32, 32) and facts.outputs[0].shape == ("batch", 10)


def test_pt2_without_card_or_not_an_archive_is_a_model_format_error(tmp_path):
    plain = tmp_path / "plain.pt2"
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(2, 2),))
    torch.export.save(program, plain)
    assert detect_format(plain) == "pt2"
    with pytest.raises(ModelFormatError, match=r"carries no extra/card\.json"):
        open_model(plain)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ModelFormatError, match=r"not a readable \.pt2 archive"):
        detect_format(junk)
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("x/data.pkl", b"")
    with pytest.raises(ModelFormatError, match=r"neither a torch\.export program nor an AOTInductor"):
        open_model(other)


def test_pt2_backend_refuses_another_format(cifar_pt2, sample_onnx_fp32):
    with pytest.raises(UsageError, match="backend pt2 cannot run a onnx file"):
        open_model(sample_onnx_fp32, backend="pt2")
    with pytest.raises(UsageError, match="backend aoti cannot run a pt2 file"):
        open_model(cifar_pt2, backend="aoti")
