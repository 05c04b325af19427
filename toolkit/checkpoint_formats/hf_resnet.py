"""Hugging Face transformers' ResNetForImageClassification, mapped onto torchvision's ResNet.

Names (transformers/models/resnet/modeling_resnet.py, transformers 5):

    resnet.embedder.embedder.{convolution,normalization}             -> conv1, bn1
    resnet.encoder.stages.S.layers.I.layer.J.{convolution,normalization}  -> layer{S+1}.I.conv{J+1}, bn{J+1}
    resnet.encoder.stages.S.layers.I.shortcut.{convolution,normalization} -> layer{S+1}.I.downsample.{0,1}
    classifier.1                                                       -> fc     (classifier.0 is Flatten)

The computation is torchvision's when the config keeps transformers' defaults
(configuration_resnet.py): stage 1 does not stride (`downsample_in_first_stage` False) and a
bottleneck strides its 3x3 convolution (`downsample_in_bottleneck` False, ResNet v1.5), with ReLU,
a 64-wide 7x7 stem and torchvision's widths. Strides store no tensors, so the config decides, and a
config that differs is refused with the reason.

Preprocessing: transformers resolves a ResNet's image processor to ConvNextImageProcessor
(models/auto/image_processing_auto.py), whose `resize` (models/convnext/image_processing_convnext.py)
resizes the shorter side to int(shortest_edge / crop_pct) and centre-crops `shortest_edge` when it
is under 384, and warps to shortest_edge x shortest_edge otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ArchitectureError
from .fields import CardFields, class_names, interpolation, resize_for_crop, rgb, side

WHAT = "transformers' config"
STEM_KEY = "resnet.embedder.embedder.convolution.weight"
CONVNEXT_FULL_CROP = 384  # at or above it ConvNextImageProcessor warps without cropping
_PART = {"convolution": 0, "normalization": 1}
_LAYER = {"convolution": "conv", "normalization": "bn"}
_RENAMES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"(^|\.)resnet\.embedder\.embedder\.(convolution|normalization)\."),
     lambda m: f"{m[1]}{'conv1' if m[2] == 'convolution' else 'bn1'}."),
    (re.compile(r"(^|\.)resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\."),
     lambda m: f"{m[1]}layer{int(m[2]) + 1}.{m[3]}.{_LAYER[m[5]]}{int(m[4]) + 1}."),
    (re.compile(r"(^|\.)resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\."),
     lambda m: f"{m[1]}layer{int(m[2]) + 1}.{m[3]}.downsample.{_PART[m[4]]}."),
    (re.compile(r"(^|\.)classifier\.1\."), lambda m: f"{m[1]}fc."),
)
# ResNetConfig's defaults (configuration_resnet.py), which a config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False, "num_channels": 3, "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
}
_PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")  # PretrainedConfig's default id2label


def is_transformers_layout(keys: Iterable[str]) -> bool:
    return any(k == STEM_KEY or k.endswith("." + STEM_KEY) for k in keys)


def to_torchvision_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """The same tensors under torchvision's names (keys no rule matches are kept, for the fit report)."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key, count=1)
        renamed[key] = value
    return renamed


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse what torchvision's layout cannot compute, with the reason."""
    model_type = config.get("model_type")
    if model_type != "resnet":
        raise ArchitectureError(f"a transformers {model_type!r} model; only ResNetForImageClassification "
                                "(model_type 'resnet') is supported")
    architectures = config.get("architectures") or ["ResNetForImageClassification"]
    architectures = architectures if isinstance(architectures, list) else [architectures]
    if "ResNetForImageClassification" not in architectures:
        raise ArchitectureError(f"a transformers {', '.join(map(str, architectures))}: only "
                                "ResNetForImageClassification carries a classifier head")
    get = {key: config.get(key, default) for key, default in _DEFAULTS.items()}
    expansion = 4 if get["layer_type"] == "bottleneck" else 1
    widths = [64 * 2**i * expansion for i in range(4)]
    reasons = {
        "layer_type": (get["layer_type"] in ("basic", "bottleneck"), "is neither basic nor bottleneck"),
        "hidden_act": (get["hidden_act"] == "relu", "is not relu, the activation of torchvision's blocks"),
        "downsample_in_first_stage": (not get["downsample_in_first_stage"],
                                      "strides the first stage, which torchvision's layer1 does not"),
        "downsample_in_bottleneck": (expansion == 1 or not get["downsample_in_bottleneck"],
                                     "strides the bottleneck's first 1x1 convolution (ResNet v1); "
                                     "torchvision's strides the 3x3 (v1.5)"),
        "num_channels": (get["num_channels"] == 3, "is not 3 (RGB)"),
        "embedding_size": (get["embedding_size"] == 64, "is not torchvision's 64-channel stem"),
        "hidden_sizes": (get["hidden_sizes"] == widths, f"are not torchvision's widths {widths}"),
    }
    for key, (ok, why) in reasons.items():
        if not ok:
            raise ArchitectureError(f"{WHAT}: {key}={get[key]!r} {why}; the toolkit's ResNet cannot "
                                    "compute this network")


def card_fields(config: Mapping[str, Any] | None, preprocessor: Mapping[str, Any] | None,
                num_classes: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """ModelCard fields from `id2label` and preprocessor_config.json, and notes."""
    out = CardFields(WHAT)
    labels = (config or {}).get("id2label")
    names = class_names(labels, num_classes)
    if names is not None and all(_PLACEHOLDER_LABEL.match(n) for n in names):
        out.note("placeholder_labels", f"{WHAT}: id2label holds transformers' placeholders LABEL_0.. "
                                       "(no class names were saved)")
    else:
        out.put("class_names", names, labels, "id2label")
    if preprocessor is not None:
        _preprocessing(preprocessor, out)
    return out.fields, out.notes


def _preprocessing(pp: Mapping[str, Any], out: CardFields) -> None:
    """mean/std (after rescale_factor), interpolation and the resize/crop geometry."""
    out.what = "preprocessor_config.json"
    factor = pp.get("rescale_factor", 1 / 255) if pp.get("do_rescale", True) else 1
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        out.note("config_ignored", f"{out.what}: rescale_factor {factor!r} is unusable; mean and std ignored")
    else:
        _normalisation(pp, 1.0 if math.isclose(255 * factor, 1.0) else 255 * factor, out)
    out.put("interpolation", interpolation(pp.get("resample")), pp.get("resample"), "resample")
    if pp.get("do_resize", True):
        _geometry(pp, out)


def _normalisation(pp: Mapping[str, Any], scale: float, out: CardFields) -> None:
    """The model sees (p * r - m) / s for pixels p in 0..255: the card's (p / 255 - m') / s' with
    m' = m / scale and s' = s / scale, scale = 255 r (1 for the usual r = 1/255)."""
    if not pp.get("do_normalize", True):
        out.put("mean", (0.0, 0.0, 0.0), False, "do_normalize")
        out.put("std", (1 / scale,) * 3, False, "do_normalize")
        return
    mean, std = rgb(pp.get("image_mean")), rgb(pp.get("image_std"), positive=True)
    out.put("mean", mean and tuple(v / scale for v in mean), pp.get("image_mean"), "image_mean")
    out.put("std", std and tuple(v / scale for v in std), pp.get("image_std"), "image_std")


def _geometry(pp: Mapping[str, Any], out: CardFields) -> None:
    given = pp.get("size")
    size: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    processor = pp.get("image_processor_type") or pp.get("feature_extractor_type") or "ConvNextImageProcessor"
    if "ConvNext" in str(processor):  # what transformers resolves for model_type resnet
        _convnext_geometry(side(size.get("shortest_edge")), pp, out)
    else:
        _generic_geometry(size, pp, out)


def _convnext_geometry(shortest: int | None, pp: Mapping[str, Any], out: CardFields) -> None:
    out.put("input_size", shortest and (3, shortest, shortest), pp.get("size"), "size")
    if shortest is None:
        return
    if shortest < CONVNEXT_FULL_CROP:
        crop_pct = pp.get("crop_pct", 224 / 256)  # ConvNextImageProcessor's default
        out.put("resize_size", resize_for_crop(shortest, crop_pct), crop_pct, "crop_pct")
        return
    out.put("resize_size", shortest, shortest, "size")
    out.note("resize_squash", f"{out.what}: at shortest_edge {shortest} the image is warped to a square; "
                              "the toolkit resizes the shorter side and centre-crops (equal for square "
                              "images)")


def _generic_geometry(size: Mapping[str, Any], pp: Mapping[str, Any], out: CardFields) -> None:
    """Resize to `shortest_edge` (keeping the aspect) or to height x width (warping), then the centre crop."""
    shortest = side(size.get("shortest_edge"))
    height, width = side(size.get("height")), side(size.get("width"))
    resize = shortest or (min(height, width) if height and width else None)
    if shortest is None and resize is not None:
        out.note("resize_squash", f"{out.what}: size {height}x{width} warps the image; the toolkit resizes "
                                  "the shorter side and centre-crops (equal for images of that aspect ratio)")
    crop = pp.get("crop_size") if pp.get("do_center_crop") else None
    if isinstance(crop, Mapping):
        height, width = side(crop.get("height")), side(crop.get("width"))
    elif shortest is not None:
        height = width = shortest
    fits = resize is not None and height is not None and width is not None and resize >= min(height, width)
    out.put("input_size", (3, height, width) if fits else None, dict(size), "size")
    out.put("resize_size", resize if fits else None, dict(size), "size")
