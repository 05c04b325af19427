"""Hugging Face transformers' ResNetForImageClassification, written by transformers itself: mapped onto the
toolkit's torchvision network it computes transformers' logits, and the card fields are what the config and
the image processor (ConvNextImageProcessor, which transformers resolves for model_type "resnet") say.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import transformers

from support.weights import perturb_batchnorm_
from toolkit.card import ModelCard
from toolkit.checkpoint import infer_architecture, load_checkpoint
from toolkit.checkpoint_formats import hf_resnet
from toolkit.errors import ArchitectureError
from toolkit.runtime.registry import detect_format, open_model

LABELS = {0: "cat", 1: "dog", 2: "eel"}
TOLERANCE = 1e-4
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SHAPES = {  # layer type -> (hidden sizes, depths, the torchvision network they are)
    "basic": ([64, 128, 256, 512], [2, 2, 2, 2], "resnet18"),
    "bottleneck": ([256, 512, 1024, 2048], [3, 4, 6, 3], "resnet50"),
}


def resnet_config(layer_type: str = "basic", **overrides):
    sizes, depths, _ = SHAPES[layer_type]
    settings = {"layer_type": layer_type, "hidden_sizes": sizes, "depths": depths, "id2label": LABELS,
                "label2id": {name: i for i, name in LABELS.items()}, **overrides}
    return transformers.ResNetConfig(**settings)


def processor(**overrides):
    settings = {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": MEAN, "image_std": STD,
                "resample": 3, **overrides}
    return transformers.ConvNextImageProcessor(**settings)


def save_folder(folder, config, image_processor=None):
    model = perturb_batchnorm_(transformers.ResNetForImageClassification(config))
    model.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    return model


@pytest.mark.slow
def test_resnet_resolves_to_convnext_image_processor(tmp_path):
    save_folder(tmp_path, resnet_config(), processor())
    resolved = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(resolved).__name__ == "ConvNextImageProcessor"


@pytest.mark.slow
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_folder_gives_transformers_logits_and_config(tmp_path, layer_type):
    folder = tmp_path / layer_type
    model = save_folder(folder, resnet_config(layer_type), processor())
    assert detect_format(folder) == "checkpoint"
    ckpt = load_checkpoint(folder)
    assert (ckpt.source, ckpt.layout, ckpt.path.name) == ("transformers", "transformers", "model.safetensors")
    assert infer_architecture(ckpt.state_dict).arch == SHAPES[layer_type][2]
    assert ckpt.config == {"class_names": ("cat", "dog", "eel"), "mean": tuple(MEAN), "std": tuple(STD),
                           "input_size": (3, 224, 224), "resize_size": 256, "interpolation": "bicubic"}
    assert load_checkpoint(folder / "model.safetensors").config == ckpt.config  # -m at the file inside
    with open_model(folder) as runner:
        x = torch.randn(3, *runner.card.input_size, generator=torch.Generator().manual_seed(1))
        ours = runner(x.numpy())
    with torch.inference_mode():
        theirs = model(pixel_values=x).logits.numpy()
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.slow
def test_the_weights_alone_load_with_transformers_defaults_noted(tmp_path):
    model = save_folder(tmp_path / "folder", resnet_config())
    shutil.copy(tmp_path / "folder" / "model.safetensors", tmp_path / "renamed.safetensors")
    ckpt = load_checkpoint(tmp_path / "renamed.safetensors")
    assert (ckpt.source, ckpt.config) == ("transformers", None)
    assert "assumed_config" in dict(ckpt.notes)
    without_processor = load_checkpoint(tmp_path / "folder").config
    assert without_processor == {"class_names": ("cat", "dog", "eel")}
    with open_model(tmp_path / "renamed.safetensors") as runner:
        x = torch.randn(2, *runner.card.input_size)
        assert np.abs(runner(x.numpy()) - model(pixel_values=x).logits.detach().numpy()).max() <= TOLERANCE


def test_the_image_processor_and_the_toolkits_preprocessing_agree(tmp_path):
    """The fields reproduce ConvNextImageProcessor: within one grey level (its resize is torchvision's)."""
    from PIL import Image

    from toolkit.preprocess import preprocess, to_uint8

    image_processor = processor()
    fields, notes = hf_resnet.card_fields(None, image_processor.to_dict(), 3)
    y, x = np.mgrid[0:320, 0:400]  # 320 -> 256 = int(224 / 0.875): the width scales to 320 exactly
    image = Image.fromarray(np.stack([127.5 + 127 * np.sin(x / 9), 127.5 + 127 * np.sin(y / 7),
                                      127.5 + 127 * np.sin((x + y) / 11)], -1).astype(np.uint8))
    card = ModelCard(arch="resnet18", class_names=("a", "b", "c"), **fields)
    ours = preprocess(np.stack([to_uint8(image, card)]), card)
    theirs = image_processor(image, return_tensors="np")["pixel_values"]
    assert notes == [] and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1.01 / 255 / min(STD)


@pytest.mark.parametrize("settings, fields, note", [
    ({"size": {"shortest_edge": 384}, "resample": 2},
     {"input_size": (3, 384, 384), "resize_size": 384, "interpolation": "bilinear"}, "resize_squash"),
    ({"do_rescale": False, "image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375]},
     {"mean": pytest.approx((0.485, 0.456, 0.406)), "std": pytest.approx((0.229, 0.224, 0.225))}, None),
    ({"do_normalize": False}, {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}, None),
    ({"resample": 4}, {}, "config_ignored"),  # BOX has no card name
    ({"crop_pct": 1.5}, {"input_size": (3, 224, 224)}, "config_ignored"),
])
def test_preprocessor_settings(settings, fields, note):
    found, notes = hf_resnet.card_fields(None, processor(**settings).to_dict(), 3)
    assert {k: found[k] for k in fields} == fields
    assert [code for code, _ in notes] == ([note] if note else [])


def test_placeholder_labels_are_not_class_names(tmp_path):
    save_folder(tmp_path, resnet_config(id2label=None, label2id=None, num_labels=3))
    ckpt = load_checkpoint(tmp_path)
    assert "class_names" not in ckpt.config and "placeholder_labels" in dict(ckpt.notes)


TINY = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "embedding_size": 8}


@pytest.mark.parametrize("layer_type, overrides, reason", [
    ("bottleneck", {"downsample_in_bottleneck": True}, "strides the bottleneck's first 1x1 convolution"),
    ("basic", {"downsample_in_first_stage": True}, "strides the first stage"),
    ("basic", {"hidden_act": "gelu"}, "hidden_act='gelu' is not relu"),
    ("basic", {}, "embedding_size=8 is not torchvision's 64-channel stem"),
])
def test_what_torchvision_cannot_compute_is_refused_with_the_reason(tmp_path, layer_type, overrides, reason):
    save_folder(tmp_path, resnet_config(layer_type, **{**TINY, **overrides}))
    with pytest.raises(ArchitectureError, match=reason):
        load_checkpoint(tmp_path)
    with pytest.raises(ArchitectureError, match=reason):  # the file inside reads the same config
        load_checkpoint(tmp_path / "model.safetensors")


def test_other_transformers_models_are_named(tmp_path):
    config = transformers.ConvNextConfig(num_labels=2, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    transformers.ConvNextForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ArchitectureError, match="a transformers 'convnext' model; only ResNetForImage"):
        load_checkpoint(tmp_path)
