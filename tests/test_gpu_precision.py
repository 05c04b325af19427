"""Issue 12, precision and device-side preprocessing: what runs on the CPU is tested here; the CUDA
paths (fp16, pinned uploads, CUDA graphs) are marked `gpu` and skip with their reason elsewhere."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from toolkit.card import ModelCard, preset
from toolkit.errors import InputError, UsageError
from toolkit.preprocess import preprocess

CARDS = {
    "cifar10": ModelCard(arch="resnet20", **preset("cifar10")),
    "cifar100": ModelCard(arch="resnet20", **preset("cifar100")),
    "imagenet": ModelCard(arch="resnet50", **{**preset("imagenet"), "class_names": ("a", "b", "c")}),
    "odd": ModelCard(arch="resnet18", class_names=("a", "b"), input_size=(3, 48, 64), resize_size=64,
                     mean=(0.2, 0.7, 0.01), std=(0.9, 0.05, 0.33)),
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_device_normalisation_equals_preprocess(name):
    from toolkit.device_preprocess import DeviceNormalizer

    card = CARDS[name]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, card.height, card.width, 3), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    expected = preprocess(images, card)
    got = DeviceNormalizer(card, "cpu")(torch.from_numpy(images))
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)  # same float32 arithmetic: bit for bit
    last = DeviceNormalizer(card, "cpu", channels_last=True)(torch.from_numpy(images))
    assert last.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(last.numpy(), expected)
    bf16 = DeviceNormalizer(card, "cpu", precision="bf16")(torch.from_numpy(images))
    assert bf16.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf16.float().numpy(), torch.from_numpy(expected).bfloat16().float().numpy())


def test_device_normalisation_refuses_float_input():
    from toolkit.device_preprocess import DeviceNormalizer

    with pytest.raises(InputError, match="uint8"):
        DeviceNormalizer(CARDS["cifar10"])(torch.zeros(1, 32, 32, 3))


def test_pinned_uploader_on_cpu_is_a_view():
    from toolkit.device_preprocess import PinnedUploader

    batch = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(PinnedUploader("cpu")(batch).numpy(), batch)


@pytest.fixture(scope="module")
def fp32_runner(sample_model):
    from toolkit.runtime.registry import open_model

    with open_model(sample_model) as runner:
        yield runner


@pytest.mark.slow
def test_run_uint8_equals_call_on_preprocessed(fp32_runner, sample_test):
    images = sample_test.images[:37]
    expected = fp32_runner(preprocess(images, fp32_runner.card))
    np.testing.assert_allclose(fp32_runner.run_uint8(images), expected, rtol=1e-5, atol=1e-5)
    torch_images = torch.from_numpy(np.ascontiguousarray(images))
    np.testing.assert_allclose(fp32_runner.run_uint8(torch_images), fp32_runner.run_uint8(images),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="uint8"):
        fp32_runner.run_uint8(torch_images.float())


def test_base_runner_run_uint8_preprocesses_on_the_host(sample_onnx_runner, sample_test):
    images = sample_test.images[:8]
    assert not sample_onnx_runner.accepts_uint8
    np.testing.assert_allclose(sample_onnx_runner.run_uint8(images),
                               sample_onnx_runner(preprocess(images, sample_onnx_runner.card)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_bf16_on_cpu_agrees_with_fp32(sample_model, sample_test, fp32_runner):
    from toolkit.metrics import logits_agreement
    from toolkit.runtime.registry import open_model

    batch = preprocess(sample_test.images[:200], fp32_runner.card)
    with open_model(sample_model, precision="bf16", channels_last=True) as runner:
        assert runner.describe()["precision"] == "bf16"
        assert next(runner.model.parameters()).dtype == torch.bfloat16  # cast once, at load
        logits = runner(batch)
    assert logits.dtype == np.float32
    check = logits_agreement(fp32_runner(batch), logits, sample_test.labels[:200])
    assert check["finite"] and check["top1_agreement"] >= 0.95
    assert 0 < check["max_abs_diff"] < 1.0  # bf16 really ran (not fp32), and is close
    assert abs(check["accuracy"] - check["reference_accuracy"]) <= 0.03


@pytest.mark.slow
def test_eval_reports_bf16_agreement_with_fp32_and_predict_takes_precision(sample_model, sample_test,
                                                                            tmp_path):
    """The CLI end: `eval --precision bf16` reports its top-1 agreement with an fp32 run (as an export's
    verification does), fp32 reports none; `predict --precision bf16` answers as fp32 does."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from toolkit.cli import app

    def run(*args: str) -> object:
        result = CliRunner().invoke(app, [*args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    common = ("eval", "-m", str(sample_model), "--dataset", "sample", "--limit", "200", "--json")
    bf16 = run(*common, "--precision", "bf16")
    check = bf16["precision_check"]
    assert bf16["precision"] == check["precision"] == "bf16" and check["reference_precision"] == "fp32"
    assert check["num_samples"] == 200 and check["top1_agreement"] >= 0.95
    assert abs(check["accuracy"] - bf16["accuracy"]) < 1e-9
    fp32 = run(*common)
    assert fp32["precision"] == "fp32" and "precision_check" not in fp32
    assert check["reference_accuracy"] == fp32["accuracy"]

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(sample_test.images[i]).save(paths[-1])
    answers = run("predict", "-m", str(sample_model), "--precision", "bf16", "--format", "json", *paths)
    reference = run("predict", "-m", str(sample_model), "--format", "json", *paths)
    assert [a["top"][0]["class"] for a in answers] == [a["top"][0]["class"] for a in reference]


def test_logits_agreement_counts():
    from toolkit.metrics import logits_agreement

    ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    out = np.array([[0.9, 0.0], [0.0, 1.1], [1.0, 2.0], [0.0, 3.0]])
    check = logits_agreement(ref, out, np.array([0, 1, 0, 0]))
    assert check["top1_agreement"] == 0.75 and check["max_abs_diff"] == pytest.approx(1.0)
    assert check["reference_accuracy"] == 0.75 and check["accuracy"] == 0.5
    with pytest.raises(InputError):
        logits_agreement(ref, out[:3])


@pytest.mark.slow
def test_fixed_shape_pads_and_splits_like_unpadded(sample_model, sample_test, fp32_runner):
    """The fixed-batch path (CUDA graphs/compile) pads a short batch and splits a long one; on the CPU
    it is exercised through the same `_execute` by fixing the shape by hand."""
    from toolkit.runtime.registry import open_model

    with open_model(sample_model) as runner:
        runner._fixed = 16
        for n in (5, 16, 40):
            images = sample_test.images[:n]
            np.testing.assert_allclose(runner.run_uint8(images), fp32_runner.run_uint8(images), rtol=1e-4,
                                       atol=1e-4)


def test_unknown_and_invalid_options_are_usage_errors(sample_model, sample_onnx_fp32):
    from toolkit.runtime.registry import open_model

    with pytest.raises(UsageError, match="precision"):
        open_model(sample_model, precision="fp8")
    with pytest.raises(UsageError, match="needs --device cuda"):
        open_model(sample_model, cuda_graphs=True)
    with pytest.raises(UsageError, match="takes no option precision"):
        open_model(sample_onnx_fp32, precision="fp16")


@pytest.mark.slow
def test_torchscript_runner_takes_precision_and_warms_up(tmp_path, sample_model, sample_test, fp32_runner):
    from export.torchscript import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.registry import open_model
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    path = export(model, card, tmp_path / "m.ts")
    calls = []
    with open_model(path, precision="bf16") as runner:
        assert runner.backend == "torchscript" and runner.precision == "bf16"
        original = runner._forward
        runner._forward = lambda x: calls.append(len(x)) or original(x)
        batch = preprocess(sample_test.images[:24], card)
        logits = runner(batch)
        runner(batch)
    # the first call at a new shape runs the profiling calls first; the second runs once
    assert calls == [24] * (1 + runner.profiling_calls) + [24]
    assert (logits.argmax(1) == fp32_runner(batch).argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_compile_on_cpu_with_a_reusable_cache(tmp_path, sample_model, sample_test, fp32_runner):
    """torch.compile (inductor, C++ on the CPU) of the sample model: same answers, cache in the folder."""
    from toolkit.runtime.registry import open_model

    cache = tmp_path / "inductor"
    images = sample_test.images[:16]
    with open_model(sample_model, compile="default", compile_cache=str(cache), batch_size=16) as runner:
        logits = runner.run_uint8(images)
        status = runner.describe()["compile_status"]
    if status.startswith("fell back"):
        pytest.skip(f"torch.compile cannot run here: {status}")
    assert status == "compiled"
    assert any(cache.rglob("*")), "inductor wrote nothing into --compile-cache"
    np.testing.assert_allclose(logits, fp32_runner.run_uint8(images), rtol=1e-3, atol=1e-3)


def test_compile_failure_falls_back_to_eager(sample_model, sample_test, fp32_runner, monkeypatch, tmp_path,
                                              caplog):
    from toolkit.runtime.registry import open_model

    def broken(model, **_):
        def call(x):
            raise RuntimeError("no C++ compiler found\nlong detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    caplog.set_level(logging.WARNING, logger="toolkit")
    with open_model(sample_model, compile="max-autotune", compile_cache=str(tmp_path / "c")) as runner:
        logits = runner.run_uint8(sample_test.images[:8])
        assert runner.describe()["compile_status"] == "fell back to eager: no C++ compiler found"
    assert "running eager" in caplog.text
    np.testing.assert_allclose(logits, fp32_runner.run_uint8(sample_test.images[:8]), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"precision": "fp16"}, {"precision": "fp16", "cuda_graphs": True},
                                     {"precision": "bf16", "batch_size": 64}])
def test_cuda_reduced_precision_agrees_with_fp32(sample_model, sample_test, fp32_runner, options):
    from toolkit.metrics import logits_agreement
    from toolkit.runtime.registry import open_model

    images = sample_test.images[:150]  # 64 + 64 + a padded 22 with batch_size=64
    with open_model(sample_model, device="cuda", **options) as runner:
        assert runner.accepts_uint8 and runner.channels_last
        logits = np.concatenate([runner.run_uint8(images[i:i + 64]) for i in range(0, 150, 64)])
        float_logits = runner(preprocess(images, runner.card))
    reference = fp32_runner.run_uint8(images)
    assert logits_agreement(reference, logits)["top1_agreement"] >= 0.99
    assert logits_agreement(reference, float_logits)["top1_agreement"] >= 0.99


@pytest.mark.gpu
def test_cuda_device_normalisation_equals_preprocess():
    from toolkit.device_preprocess import DeviceNormalizer, PinnedUploader

    card = CARDS["imagenet"]
    images = np.random.default_rng(2).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    got = DeviceNormalizer(card, "cuda")(PinnedUploader("cuda")(images)).cpu().numpy()
    np.testing.assert_allclose(got, preprocess(images, card), rtol=0, atol=1e-6)
