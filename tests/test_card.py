from __future__ import annotations

import json

import pytest

from toolkit.card import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CardError,
    ModelCard,
    imagenet_classes,
    load_sidecar,
    read_class_names,
    sidecar_path,
)
from toolkit.card_layers import resolve_card
from toolkit.errors import DataError, UsageError


def test_round_trip_keeps_every_field(tmp_path):
    card = ModelCard(arch="resnet20", class_names=CIFAR10_CLASSES, input_size=(3, 32, 32), resize_size=32,
                     mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), shortcut="A", source_sha256="ab" * 32,
                     extra={"note": "x"})
    assert ModelCard.from_json(card.to_json()) == card
    card.save(sidecar_path(tmp_path / "m.pt"))
    assert load_sidecar(tmp_path / "m.pt") == card
    assert (tmp_path / "m.pt.card.json").is_file()


def test_num_classes_is_derived_and_checked():
    card = ModelCard(arch="resnet18", class_names=("a", "b", "c"))
    assert card.num_classes == 3
    data = card.to_dict()
    data["num_classes"] = 4
    with pytest.raises(DataError, match="num_classes=4"):
        ModelCard.from_dict(data)


def test_presets_have_real_class_names():
    assert len(CIFAR100_CLASSES) == 100 and len(set(CIFAR100_CLASSES)) == 100
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    assert read_class_names("cifar10") == CIFAR10_CLASSES


def test_class_file_lines_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("cat\ndog\n\n")
    (tmp_path / "b.json").write_text(json.dumps(["x", "y", "z"]))
    assert read_class_names(str(tmp_path / "a.txt")) == ("cat", "dog")
    assert read_class_names(str(tmp_path / "b.json")) == ("x", "y", "z")
    with pytest.raises(UsageError, match="neither a preset"):
        read_class_names(str(tmp_path / "missing.txt"))


def test_resolver_precedence_flag_over_card_over_preset_over_default():
    card = ModelCard(arch="resnet20", class_names=tuple("abcdefghij"), input_size=(3, 32, 32), resize_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    # default: a CIFAR stem with 10 classes gets the cifar10 preset
    plain = resolve_card(arch="resnet20", num_classes=10, stem="cifar")
    assert plain.class_names == CIFAR10_CLASSES and plain.input_size == (3, 32, 32)
    # the card beats the preset
    carded = resolve_card(arch="resnet20", num_classes=10, stem="cifar", card=card)
    assert carded.class_names == tuple("abcdefghij") and carded.mean == (0.5, 0.5, 0.5)
    # a flag beats the card
    flagged = resolve_card(arch="resnet20", num_classes=10, stem="cifar", card=card,
                           flags={"mean": (0.1, 0.1, 0.1)})
    assert flagged.mean == (0.1, 0.1, 0.1) and flagged.class_names == tuple("abcdefghij")
    # an imagenet stem with 1000 classes gets ImageNet's names and 224 input
    imagenet = resolve_card(arch="resnet50", num_classes=1000, stem="imagenet")
    assert imagenet.num_classes == 1000 and imagenet.input_size == (3, 224, 224)
    assert imagenet.resize_size == 256
    # a head that fits no preset gets generic names, never a wrong class count
    odd = resolve_card(arch="resnet50", num_classes=7, stem="imagenet")
    assert odd.class_names == tuple(f"class_{i}" for i in range(7))


@pytest.mark.parametrize("changes, message", [
    ({"class_names": ()}, "class_names is empty"),
    ({"std": (0.0, 1.0, 1.0)}, "std must be positive"),
    ({"input_size": (1, 32, 32)}, "input_size"),
    ({"interpolation": "magic"}, "interpolation"),
])
def test_invalid_cards_are_refused(changes, message):
    base = {"arch": "resnet20", "class_names": ("a",), "input_size": (3, 32, 32), "resize_size": 32}
    with pytest.raises(CardError, match=message):
        ModelCard(**{**base, **changes})
