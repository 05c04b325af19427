"""Card flags on every command, and the one precedence of a card's layers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support.cli import invoke
from toolkit.card import CIFAR10_CLASSES, ModelCard
from toolkit.card_layers import CardFlags, override_card, resolve_card
from toolkit.errors import UsageError

CARD_FLAGS = ("--classes", "--mean", "--std", "--input-size", "--resize", "--crop-pct", "--interpolation")


CARD_COMMANDS = ["validate", "export", "eval", "predict", "compare", "serve", "benchmark"]


@pytest.mark.parametrize("command", CARD_COMMANDS)
def test_every_command_that_builds_a_card_takes_the_card_flags(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    missing = [flag for flag in CARD_FLAGS if flag not in result.output]
    assert not missing, f"{command} lacks {missing}"


def test_flags_parse_to_typed_values():
    flags = CardFlags.parse(mean="0.485,0.456,0.406", std="58.395,57.12,57.375", input_size="32x40",
                            crop_pct=0.875, interpolation="bicubic", classes="cifar10")
    assert flags.mean == (0.485, 0.456, 0.406)
    assert flags.std == pytest.approx((0.229, 0.224, 0.225))  # 0-255 units are divided by 255
    assert flags.input_size == (32, 40) and flags.preset == "cifar10"
    fields = flags.fields({})
    assert fields["input_size"] == (3, 32, 40) and fields["resize_size"] == int(32 / 0.875)
    assert fields["class_names"] == CIFAR10_CLASSES and fields["interpolation"] == "bicubic"
    assert not CardFlags() and CardFlags(mean=(0.1, 0.1, 0.1))


def test_crop_pct_is_timms_resize():
    """timm: scale_size = floor(img_size / crop_pct): 224 at 0.875 -> 256, at 0.95 -> 235."""
    assert CardFlags.parse(input_size="224", crop_pct=0.875).fields({})["resize_size"] == 256
    assert CardFlags.parse(crop_pct=0.95).fields({"input_size": (3, 224, 224)})["resize_size"] == 235


@pytest.mark.parametrize("given, says", [
    ({"mean": "1,2"}, "--mean takes three"),
    ({"std": "0.2,0,0.2"}, "--std must be positive"),
    ({"input_size": "big"}, "--input-size takes N or HxW"),
    ({"resize": 256, "crop_pct": 0.875}, "give one"),
    ({"crop_pct": 1.5}, "--crop-pct is a fraction"),
    ({"classes": "no-such-file.txt"}, "neither a preset"),
])
def test_malformed_flags_are_one_usage_error(given, says):
    with pytest.raises(UsageError, match=says):
        CardFlags.parse(**given)


def test_layers_in_their_one_order():
    """preset < known weights < checkpoint config < embedded card < flags; facts hold over all."""
    known = {"mean": (0.1, 0.1, 0.1), "std": (0.2, 0.2, 0.2), "resize_size": 40, "input_size": (3, 32, 32)}
    config = {"std": (0.3, 0.3, 0.3), "class_names": tuple("abcdefghij")}
    card = ModelCard(arch="resnet20", class_names=tuple("ABCDEFGHIJ"), input_size=(3, 32, 32), resize_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def resolved(**layers):
        return resolve_card(arch="resnet20", num_classes=10, stem="cifar", facts={"shortcut": "A"}, **layers)

    assert resolved().mean == (0.4914, 0.4822, 0.4465)  # the cifar10 preset
    assert resolved(known=known).mean == (0.1, 0.1, 0.1)
    from_config = resolved(known=known, config=config)
    assert (from_config.mean, from_config.std, from_config.resize_size) == ((0.1,) * 3, (0.3,) * 3, 40)
    assert from_config.class_names == tuple("abcdefghij")
    assert resolved(known=known, config=config, card=card).std == (0.5, 0.5, 0.5)
    flagged = resolved(known=known, config=config, card=card, flags=CardFlags.parse(std="0.7,0.7,0.7"))
    assert flagged.std == (0.7,) * 3 and flagged.class_names == tuple("ABCDEFGHIJ")
    assert flagged.shortcut == "A"


def test_a_layer_whose_classes_do_not_fit_the_head_keeps_its_preprocessing():
    config = {"class_names": ("cat", "dog"), "mean": (0.2, 0.2, 0.2)}
    card = resolve_card(arch="resnet20", num_classes=10, stem="cifar", config=config)
    assert card.class_names == CIFAR10_CLASSES and card.mean == (0.2, 0.2, 0.2)
    with pytest.raises(UsageError, match="lists 100 classes but the model has 10"):
        resolve_card(arch="resnet20", num_classes=10, stem="cifar", flags=CardFlags.parse(classes="cifar100"))


def test_override_names_what_it_overrides(caplog):
    card = ModelCard(arch="resnet20", class_names=CIFAR10_CLASSES, input_size=(3, 32, 32), resize_size=32)
    assert override_card(card, CardFlags(), "m.onnx") is card
    assert override_card(card, CardFlags.parse(mean=",".join(map(str, card.mean))), "m.onnx") == card
    with caplog.at_level("WARNING", logger="toolkit.notice"):
        changed = override_card(card, CardFlags.parse(mean="0.5,0.5,0.5", std="0.5,0.5,0.5"), "m.onnx")
    assert changed.mean == (0.5,) * 3 and "--mean, --std override the card of m.onnx" in caplog.text


def test_flags_override_an_onnx_card_in_predict(sample_onnx_fp32, tmp_path):
    image = tmp_path / "digit.png"
    shutil.copy(_a_sample_image(), image)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit-{i}" for i in range(10)))
    plain = json.loads(invoke("predict", "-m", sample_onnx_fp32, image, "--format", "json").stdout)
    named = invoke("predict", "-m", sample_onnx_fp32, image, "--format", "json", "--classes", names)
    assert named.exit_code == 0, named.output
    assert "--classes overrides the card of" in named.stderr
    top = json.loads(named.stdout)[0]["top"][0]
    assert top["class"] == f"digit-{plain[0]['top'][0]['index']}"
    shifted = json.loads(invoke("predict", "-m", sample_onnx_fp32, image, "--format", "json", "--mean",
                                "0.9,0.9,0.9").stdout)
    assert not np.isclose(shifted[0]["top"][0]["probability"], plain[0]["top"][0]["probability"])
    wrong = invoke("predict", "-m", sample_onnx_fp32, image, "--classes", "cifar100")
    assert wrong.exit_code == 2 and "lists 100 classes but the model has 10 outputs" in wrong.output


@pytest.mark.slow
def test_checkpoint_flags_reach_the_exported_card(sample_model, tmp_path):
    """`export --mean/--std`: the ONNX carries the merged card (flag over the sidecar card)."""
    from toolkit.runtime.registry import read_artifact

    out = tmp_path / "flagged.onnx"
    result = invoke("export", "-m", sample_model, "-o", out, "--no-verify", "--mean", "0.3,0.3,0.3",
                    "--std", "0.35,0.35,0.35", "--resize", "36")
    assert result.exit_code == 0, result.output
    assert "--mean, --resize/--crop-pct, --std override the card of" in result.stderr  # the sidecar's
    card, _ = read_artifact(out)
    assert (card.mean, card.std, card.resize_size) == ((0.3,) * 3, (0.35,) * 3, 36)
    assert card.class_names == tuple(str(i) for i in range(10))  # the sidecar's names, no flag on them


def _a_sample_image():
    from toolkit.sample import SAMPLE_MODEL

    return next((SAMPLE_MODEL.parent / "images").glob("*.png"))
