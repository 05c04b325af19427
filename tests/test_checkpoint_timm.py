"""timm checkpoints, written by timm itself: the toolkit's own network computes timm's logits, and the card
fields come from timm's config.json as timm's own data config and eval transform read them.

timm (like transformers) is a test-only dependency: the toolkit never imports it (checked below).
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from support.weights import perturb_batchnorm_
from toolkit.archs import ARCHS, build_model
from toolkit.checkpoint import infer_architecture, load_checkpoint
from toolkit.errors import ArchitectureError
from toolkit.runtime.registry import detect_format, open_model

NUM_CLASSES = 7
LABELS = [f"label_{i}" for i in range(NUM_CLASSES)]
TOLERANCE = 1e-4


def save_timm(name: str, folder, *, safe: bool = True, seed: int = 0, **kwargs) -> torch.nn.Module:
    model = perturb_batchnorm_(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs),
                               seed)
    timm.models.save_for_hf(model, folder, safe_serialization=safe, model_config={"label_names": LABELS})
    return model


def expected_fields(folder) -> dict:
    """What timm itself makes of the folder's config: resolve_model_data_config's size, crop and
    normalisation, and transforms_imagenet_eval's resize (floor(size / crop_pct))."""
    config = json.loads((folder / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    data = timm.data.resolve_data_config(pretrained_cfg=cfg)
    size = data["input_size"]
    return {"class_names": tuple(config["label_names"]), "mean": tuple(data["mean"]),
            "std": tuple(data["std"]), "input_size": tuple(size), "interpolation": data["interpolation"],
            "resize_size": math.floor(min(size[1:]) / data["crop_pct"])}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50d", "resnet26d", "resnext50_32x4d"])
def test_timm_folder_gives_timms_logits_and_config(tmp_path, name):
    folder = tmp_path / name
    model = save_timm(name, folder)
    assert detect_format(folder) == "checkpoint"
    ckpt = load_checkpoint(folder)
    assert (ckpt.source, ckpt.path.name, ckpt.folder) == ("timm", "model.safetensors", folder)
    assert infer_architecture(ckpt.state_dict).arch == name
    assert ckpt.config == expected_fields(folder)
    assert load_checkpoint(folder / "model.safetensors").config == ckpt.config  # -m at the file inside
    with open_model(folder) as runner:
        x = torch.randn(3, *runner.card.input_size, generator=torch.Generator().manual_seed(1))
        ours = runner(x.numpy())
    with torch.inference_mode():
        theirs = model(x).numpy()
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.slow
def test_pytorch_model_bin_folder_and_a_bare_state_dict(tmp_path):
    model = save_timm("resnet26d", tmp_path / "bin", safe=False)
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    ckpt = load_checkpoint(tmp_path / "bin")
    assert (ckpt.source, ckpt.path.name) == ("timm", "pytorch_model.bin")
    torch.save(model.state_dict(), tmp_path / "weights.pth")  # no config: the tensors alone
    bare = load_checkpoint(tmp_path / "weights.pth")
    assert (bare.source, bare.layout, bare.config) == ("torch", "timm", None)
    info = infer_architecture(bare.state_dict)
    assert (info.arch, info.spec.stem, info.spec.stem_type, info.spec.avg_down) == (
        "resnet26d", "imagenet", "deep", True)
    network = build_model(info.arch, info.num_classes)
    network.load_state_dict(bare.state_dict, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert (network(x) - model(x)).abs().max() <= TOLERANCE


def test_the_toolkit_never_imports_timm_or_transformers():
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in (root / "toolkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("timm", "transformers")]
    assert found == []


TIMM_NAMES = sorted(name for name in ARCHS if ARCHS[name].stem == "imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_every_registered_imagenet_name_is_timms_network(name):
    """Each registry entry has timm's tensors under timm's name (shapes on the meta device: free)."""
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).state_dict()
        ours = build_model(name, NUM_CLASSES).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert infer_architecture(theirs).arch == name


@pytest.mark.slow
def test_timm_eval_transform_equals_the_toolkits_preprocessing(tmp_path):
    """The card fields reproduce timm's own eval transform on an image (exact when the resize is whole)."""
    from PIL import Image

    from toolkit.card import ModelCard
    from toolkit.preprocess import preprocess, to_uint8

    save_timm("resnet26t", tmp_path / "t")  # 256 px at crop 0.94, bicubic
    config = load_checkpoint(tmp_path / "t").config
    model = timm.create_model("resnet26t", pretrained=False, num_classes=NUM_CLASSES)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    y, x = np.mgrid[0:340, 0:425]  # 340 -> 272 = floor(256 / 0.94): the width scales to 340 exactly
    image = Image.fromarray(np.stack([127.5 + 127 * np.sin(x / 9), 127.5 + 127 * np.sin(y / 7),
                                      127.5 + 127 * np.sin((x + y) / 11)], -1).astype(np.uint8))
    card = ModelCard(arch="resnet26t", class_names=config["class_names"],
                     **{k: v for k, v in config.items() if k != "class_names"})
    ours = preprocess(np.stack([to_uint8(image, card)]), card)[0]
    assert np.abs(ours - transform(image).numpy()).max() <= 1e-5


@pytest.mark.parametrize("name, layers", [("seresnet50", "squeeze-and-excitation (SE) layers: layer1.0.se"),
                                          ("ecaresnet50d", "efficient channel attention (ECA) layers"),
                                          ("resnetrs50", "convolutional stem pool")])
def test_attention_layers_are_refused_by_name(name, layers):
    with torch.device("meta"):
        state = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).state_dict()
    with pytest.raises(ArchitectureError, match=rf"unsupported ResNet variant with .*{re.escape(layers)}"):
        infer_architecture(state)


def test_tensorless_anti_aliasing_is_refused_from_the_config(tmp_path):
    """BlurPool2d's filter is not saved: resnetblur18's tensors equal resnet18's, only the config tells."""
    from safetensors.torch import load_file

    save_timm("resnetblur18", tmp_path / "blur")
    assert infer_architecture(load_file(tmp_path / "blur" / "model.safetensors")).arch == "resnet18"
    with pytest.raises(ArchitectureError, match=r"'resnetblur18' is not supported \(its blur-pool"):
        load_checkpoint(tmp_path / "blur")


@pytest.mark.slow
def test_model_args_that_change_the_network_are_refused(tmp_path):
    save_timm("resnet18d", tmp_path / "os16", output_stride=16)
    with pytest.raises(ArchitectureError, match="output_stride=16 changes the network"):
        load_checkpoint(tmp_path / "os16")
