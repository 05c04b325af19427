"""ONNX export: every architecture family loads back in ONNX Runtime and agrees with eager PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import onnx as onnx_export
from toolkit.card_layers import resolve_card
from toolkit.errors import ExportError, UsageError
from toolkit.runtime.onnxruntime_runner import OnnxRuntimeRunner


def random_net(arch: str, size: int, classes: int = 10, seed: int = 0):
    """Random-init network in eval mode with non-trivial BatchNorm statistics and affine terms."""
    from toolkit.archs import ARCHS, build_model

    torch.manual_seed(seed)
    model = build_model(arch, classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            assert n > 0
    spec = ARCHS[arch]
    names = tuple(f"c{i}" for i in range(classes))
    card = resolve_card(arch=arch, num_classes=classes, stem=spec.stem,
                        flags={"class_names": names, "input_size": (3, size, size), "resize_size": size,
                               "mean": (0.1, 0.2, 0.3), "std": (0.9, 0.8, 0.7)})
    return model.eval(), card


def eager(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def inputs(card, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *card.input_size)).astype(np.float32)


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
    assert (out.argmax(1) == ref.argmax(1)).all()


CASES = [
    pytest.param("resnet20", 32, 18, id="cifar-resnet20-dynamo"),
    pytest.param("resnet18", 64, 17, id="resnet18-legacy"),
    pytest.param("resnext29_32x4d", 32, 18, id="cifar-resnext29-dynamo", marks=pytest.mark.slow),
    pytest.param("resnet18", 64, 18, id="resnet18-dynamo", marks=pytest.mark.slow),
    pytest.param("resnet50", 64, 18, id="resnet50-dynamo", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 64, 18, id="resnext50-dynamo", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "size", "opset"), CASES)
def test_onnx_round_trip_agrees_with_eager(tmp_path, arch, size, opset):
    model, card = random_net(arch, size)
    path = onnx_export.export(model, card, tmp_path / "m.onnx", opset=opset)
    with OnnxRuntimeRunner.open(path) as runner:
        assert runner.fixed_batch_size is None
        assert runner.card == card  # class names, mean/std, input size survive the trip
        for n in (1, 7):  # dynamic batch: one and an odd size
            batch = inputs(card, n)
            assert_close(runner(batch), eager(model, batch))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporaries left


@pytest.mark.slow
def test_static_batch_pads_and_chunks(tmp_path):
    model, card = random_net("resnet20", 32)
    path = onnx_export.export(model, card, tmp_path / "s.onnx", opset=17, dynamic=False, batch_size=4)
    with OnnxRuntimeRunner.open(path) as runner:
        assert runner.fixed_batch_size == 4
        batch = inputs(card, 7)
        assert_close(runner(batch), eager(model, batch))


@pytest.mark.slow
def test_fp16_keeps_float32_io_and_agrees(tmp_path):
    import onnx

    model, card = random_net("resnet20", 32)
    path = onnx_export.export(model, card, tmp_path / "h.onnx", opset=17, precision="fp16")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    with OnnxRuntimeRunner.open(path) as runner:
        assert runner.precision == "fp16"
        batch = inputs(card, 16)
        out, ref = runner(batch), eager(model, batch)
        assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_external_data_for_large_models(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1)  # pretend the model is over 2 GB
    model, card = random_net("resnet20", 32)
    path = onnx_export.export(model, card, tmp_path / "big.onnx", opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    with OnnxRuntimeRunner.open(path) as runner:
        batch = inputs(card, 3)
        assert_close(runner(batch), eager(model, batch))


@pytest.mark.parametrize("opset", [99, 5])
def test_opset_out_of_range_is_a_usage_error(tmp_path, opset):
    model, card = random_net("resnet20", 32)
    with pytest.raises(UsageError, match="opset"):
        onnx_export.export(model, card, tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_failed_check_leaves_nothing_behind(tmp_path, monkeypatch):
    import onnx

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("synthetic failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    model, card = random_net("resnet20", 32)
    with pytest.raises(ExportError, match="synthetic failure"):
        onnx_export.export(model, card, tmp_path / "m.onnx", opset=17)
    assert not list(tmp_path.iterdir())


def test_int8_requires_the_quantiser(tmp_path):
    model, card = random_net("resnet20", 32)
    with pytest.raises(UsageError, match="calibration"):
        onnx_export.export(model, card, tmp_path / "m.onnx", precision="int8")
