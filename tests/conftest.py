"""Shared fixtures: the bundled sample model and data, and tiny generated checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.sample import SAMPLE_MODEL


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests skip, with the reason, where CUDA is not usable (torch imported only then)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_model() -> Path:
    """The committed CIFAR ResNet-20 trained on the sample digits (with its sidecar card)."""
    return SAMPLE_MODEL


@pytest.fixture(scope="session")
def sample_test():
    from toolkit.data import load_sample

    return load_sample("test")


@pytest.fixture(scope="session")
def sample_card(sample_model):
    from toolkit.card import load_sidecar

    return load_sidecar(sample_model)


@pytest.fixture(scope="session")
def sample_onnx_fp32(tmp_path_factory, sample_model):
    """The sample model exported to fp32 ONNX once per session (export.onnx), for eval/predict tests."""
    from export.onnx import export
    from toolkit.checkpoint import load_checkpoint
    from toolkit.runtime.torch_runner import build_from_checkpoint

    model, card, _ = build_from_checkpoint(load_checkpoint(sample_model))
    return export(model, card, tmp_path_factory.mktemp("sample_onnx") / "sample.onnx")


@pytest.fixture(scope="session")
def sample_onnx_runner(sample_onnx_fp32):
    """One ONNX Runtime session over the sample ONNX, shared by the tests that only call it."""
    from toolkit.runtime.registry import open_model

    with open_model(sample_onnx_fp32) as runner:
        yield runner


@pytest.fixture(scope="session")
def sample_onnx_int8(tmp_path_factory, sample_onnx_fp32, sample_card):
    """Q/DQ int8 of the sample model (u8 activations, s8 per-channel weights), calibrated on the sample
    train split."""
    from export.quantize import quantize
    from toolkit.data import load_sample

    output = tmp_path_factory.mktemp("sample_int8") / "sample.int8.onnx"
    return quantize(sample_onnx_fp32, sample_card, output, load_sample("train"), calib_size=256)
