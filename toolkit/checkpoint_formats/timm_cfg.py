"""timm's config.json: the card fields it states and the architecture it names.

`timm.models.save_for_hf` (timm/models/_hub.py `save_config_for_hf`) writes `architecture`,
`num_classes`, `label_names` and `model_args` at the top level, and the preprocessing in
`pretrained_cfg`: `input_size` (3, H, W), `interpolation`, `crop_pct`, `crop_mode`, `mean`, `std`
(plus `test_input_size`/`test_crop_pct`). Older configs are one flat dict with `labels`
(`_parse_model_cfg` in the same file reads both). The card follows
`timm.data.resolve_model_data_config(model)`, which uses `input_size` and `crop_pct` (not the test
ones), and `transforms_imagenet_eval` (timm/data/transforms_factory.py), which resizes the shorter
side to floor(size / crop_pct) then centre-crops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..archs import ARCHS, ArchSpec
from ..errors import ArchitectureError
from .fields import CardFields, class_names, input_size, interpolation, resize_for_crop, rgb

WHAT = "timm's config.json"
DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, used when a config gives none
# model_args that do not change what a trained network computes at evaluation, with the value ours has.
_NEUTRAL_ARGS: dict[str, Any] = {"num_classes": None, "in_chans": 3, "global_pool": "avg", "drop_rate": None,
                                 "drop_path_rate": None, "drop_block_rate": None, "zero_init_last": None}
# timm models whose extra layers store no tensors, so only the name tells them apart (timm/models/resnet.py):
# BlurPool2d's filter is a non-persistent buffer, aa_layer=nn.AvgPool2d has no parameters.
_TENSORLESS_LAYERS = (("blur", "blur-pool anti-aliasing (BlurPool2d)"),
                      ("resnetaa", "average-pool anti-aliasing"))


def pretrained_cfg(config: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = config.get("pretrained_cfg")
    return nested if isinstance(nested, Mapping) else config  # the legacy flat layout


def architecture_name(config: Mapping[str, Any]) -> str:
    """`resnet50d` from `resnet50d` or `resnet50d.ra2_in1k` (a name with its pretrained tag)."""
    return str(config.get("architecture", "")).split(".")[0]


def check_architecture(config: Mapping[str, Any], spec: ArchSpec) -> None:
    """The config's architecture and model_args must be the network the tensors describe."""
    name = architecture_name(config)
    if name != spec.name:
        if name in ARCHS:
            raise ArchitectureError(f"{WHAT} names {name}, but the tensors are a {spec.name}")
        layers = next((what for marker, what in _TENSORLESS_LAYERS if marker in name), None)
        why = f"its {layers} layers store no tensors" if layers else "it is not a plain ResNet/ResNeXt"
        raise ArchitectureError(f"timm architecture {name!r} is not supported ({why}); the tensors alone "
                                f"would be taken for {spec.name} and compute something else")
    args = config.get("model_args")  # what timm builds from (`_parse_model_cfg`); the top-level
    args = args if isinstance(args, Mapping) else {}  # global_pool and num_features are informational
    for key, value in args.items():
        if key not in _NEUTRAL_ARGS:
            raise ArchitectureError(f"{WHAT}: model_args {key}={value!r} changes the network; the toolkit's "
                                    f"{spec.name} is built with timm's defaults only")
        wanted = _NEUTRAL_ARGS[key]
        if wanted is not None and value != wanted:
            raise ArchitectureError(f"{WHAT}: {key}={value!r} is not supported (the toolkit's networks use "
                                    f"{key}={wanted!r})")


def card_fields(config: Mapping[str, Any], num_classes: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """ModelCard fields (class_names, mean, std, input_size, resize_size, interpolation) and notes."""
    cfg = pretrained_cfg(config)
    out = CardFields(WHAT)
    labels = config.get("label_names") or cfg.get("label_names") or cfg.get("labels")
    out.put("class_names", class_names(labels, num_classes), labels, "label_names")
    out.put("mean", rgb(cfg.get("mean")), cfg.get("mean"), "pretrained_cfg.mean")
    out.put("std", rgb(cfg.get("std"), positive=True), cfg.get("std"), "pretrained_cfg.std")
    out.put("interpolation", interpolation(cfg.get("interpolation")), cfg.get("interpolation"),
            "pretrained_cfg.interpolation")
    size = input_size(cfg.get("input_size"))
    out.put("input_size", size, cfg.get("input_size"), "pretrained_cfg.input_size")
    if size is not None:
        crop = cfg.get("crop_pct", DEFAULT_CROP_PCT)
        out.put("resize_size", resize_for_crop(min(size[1:]), crop), crop, "pretrained_cfg.crop_pct")
    mode = cfg.get("crop_mode", "center")
    if mode != "center":
        out.note("crop_mode", f"{WHAT}: crop_mode {mode!r}; the toolkit resizes the shorter side and "
                              "centre-crops (timm's 'center')")
    test_size = input_size(cfg.get("test_input_size"))
    if test_size is not None and test_size != size:
        out.note("test_input_size", f"{WHAT} also names a test-time size {test_size[1]}x{test_size[2]} "
                                    f"(crop {cfg.get('test_crop_pct', 'as above')}); the card uses "
                                    "input_size, as timm.data.resolve_model_data_config does")
    return out.fields, out.notes
