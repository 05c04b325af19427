"""timm and transformers checkpoints, written by those libraries, exported by `toolkit export` to ONNX: the
ONNX computes the library's own logits, and carries the card the library's config states.

(The torch runner's parity and the config fields are checked in test_checkpoint_timm.py and
test_checkpoint_transformers.py; this file follows the same folders through the user's export.)
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import transformers

from support.cli import invoke
from support.weights import perturb_batchnorm_
from test_checkpoint_timm import LABELS, NUM_CLASSES, expected_fields
from test_checkpoint_transformers import SHAPES, processor, resnet_config
from toolkit.runtime.registry import open_model, read_artifact

TOLERANCE = 1e-4
TRAINED_LOGITS = 10.0  # |logit| of a trained ImageNet classifier is of this order
pytestmark = pytest.mark.slow  # six ResNet-50-sized ONNX exports


@torch.no_grad()
def _trained_scale_(model, head, forward):
    """Scale the head so logits are as large as a trained classifier's. With perturbed BatchNorm a
    random ResNet-50 gives logits up to ~650, where float32 rounding alone (torch fp32 against fp64)
    is 5e-4: an absolute 1e-4 would then measure float32, not the export."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    factor = TRAINED_LOGITS / float(forward(x).abs().max())
    head.weight.mul_(factor)
    head.bias.mul_(factor)
    return model


def _exported(folder, tmp_path):
    """`toolkit export -m FOLDER --format onnx`, verified against the toolkit's eager network."""
    out = tmp_path / f"{folder.name}.onnx"
    result = invoke("export", "-m", folder, "--format", "onnx", "-o", out, "--verify-samples", "4")
    assert result.exit_code == 0, result.output
    return out


def _max_diff(onnx_path, forward) -> float:
    with open_model(onnx_path) as runner:
        x = torch.randn(2, *runner.card.input_size, generator=torch.Generator().manual_seed(3))
        ours = runner(x.numpy())
    with torch.inference_mode():
        theirs = forward(x)
    return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("name", ["resnet50", "resnet50d", "resnet26d", "resnext50_32x4d"])
def test_timm_checkpoint_to_onnx(tmp_path, name):
    folder = tmp_path / name
    model = perturb_batchnorm_(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES))
    _trained_scale_(model, model.fc, model)
    timm.models.save_for_hf(model, folder, model_config={"label_names": LABELS})
    onnx_path = _exported(folder, tmp_path)
    assert _max_diff(onnx_path, lambda x: model(x).numpy()) <= TOLERANCE
    card, _ = read_artifact(onnx_path)
    expected = expected_fields(folder)
    assert {field: getattr(card, field) for field in expected} == expected


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_transformers_checkpoint_to_onnx(tmp_path, layer_type):
    folder = tmp_path / layer_type
    model = perturb_batchnorm_(transformers.ResNetForImageClassification(resnet_config(layer_type)))
    _trained_scale_(model, model.classifier[1], lambda x: model(pixel_values=x).logits)
    model.save_pretrained(folder)
    processor().save_pretrained(folder)
    onnx_path = _exported(folder, tmp_path)
    assert _max_diff(onnx_path, lambda x: model(pixel_values=x).logits.numpy()) <= TOLERANCE
    card, _ = read_artifact(onnx_path)
    assert card.arch == SHAPES[layer_type][2]
    assert (card.class_names, card.input_size, card.resize_size, card.interpolation) == (
        ("cat", "dog", "eel"), (3, 224, 224), 256, "bicubic")
