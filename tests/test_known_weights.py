"""Recognised public weights: the data file's shape, and recognition by digest end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil

import pytest

from support.cli import invoke
from toolkit import known_weights as known_module
from toolkit.archs import ARCHS
from toolkit.errors import DataError
from toolkit.known_weights import KnownWeights, known_weights, parse_entry, recognise

TORCHVISION_ARCHS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"}


def test_every_entry_is_complete_typed_and_cited():
    entries = known_weights()
    for entry in entries:
        assert entry.arch in ARCHS, entry.file
        assert re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{64}", entry.sha256), entry.file
        hub_hash = re.search(r"-([0-9a-f]{8,})\.\w+$", entry.file)  # torch.hub's HASH_REGEX convention
        assert hub_hash and entry.sha256.startswith(hub_hash.group(1)), entry.file
        assert entry.url.startswith("https://") and entry.url.endswith(entry.file)
        assert "/" in entry.source or ".py" in entry.source, f"{entry.file}: no citation"
        assert 0 < entry.top1 <= 100 and entry.resize_size >= entry.input_size
        assert (entry.shortcut is None) == (ARCHS[entry.arch].stem == "imagenet"), entry.file
    by_publisher = {p: [e for e in entries if e.publisher == p] for p in {e.publisher for e in entries}}
    torchvision = by_publisher["torchvision"]
    assert {e.arch for e in torchvision} == TORCHVISION_ARCHS
    assert {e.name.rsplit(".", 1)[1] for e in torchvision} == {"IMAGENET1K_V1", "IMAGENET1K_V2"}
    assert sorted(int(e.arch[6:]) for e in by_publisher["akamaster/pytorch_resnet_cifar10"]) == [
        20, 32, 44, 56, 110, 1202]
    chenyaofo = by_publisher["chenyaofo/pytorch-cifar-models"]
    assert {(e.classes, e.arch) for e in chenyaofo} == {
        (c, f"resnet{d}") for c in ("cifar10", "cifar100") for d in (20, 32, 44, 56)}
    assert len({e.sha256 for e in entries}) == len(entries)


def test_publishers_preprocessing_as_read_from_their_code():
    """akamaster normalised CIFAR-10 with ImageNet's mean/std (trainer.py); torchvision's V2 weights
    resize to 232 (ResNet50_Weights.IMAGENET1K_V2)."""
    akamaster = recognise("12fca82f")
    assert akamaster is not None and akamaster.arch == "resnet20" and akamaster.shortcut == "A"
    assert akamaster.mean == (0.485, 0.456, 0.406) and akamaster.card_fields()["input_size"] == (3, 32, 32)
    v2 = recognise("11ad3fa6")
    assert v2 is not None and (v2.arch, v2.resize_size, v2.input_size) == ("resnet50", 232, 224)
    assert recognise("11ad3fa6", arch="resnet18") is None  # a digest of another architecture: not it


def test_a_malformed_entry_is_refused_by_name():
    good = dataclasses.asdict(known_weights()[0])
    with pytest.raises(DataError, match="sha256 must be"):
        parse_entry({**good, "sha256": "xyz"})
    with pytest.raises(DataError, match="interpolation"):
        parse_entry({**good, "interpolation": "cubic-ish"})
    with pytest.raises(DataError, match="mean"):
        parse_entry({k: v for k, v in good.items() if k != "mean"})


@pytest.fixture
def recognised_copy(tmp_path, sample_model, sample_card, monkeypatch):
    """The sample weights without their card, listed in the table by this test under their own digest,
    with the sample card's preprocessing: as a user's download of a public file."""
    path = tmp_path / "published-weights.pt"
    shutil.copy(sample_model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = KnownWeights(
        publisher="example.org/cifar-digits", name="resnet20-digits", file=f"resnet20-{digest[:8]}.pt",
        sha256=digest, url=f"https://example.org/resnet20-{digest[:8]}.pt", arch="resnet20",
        classes=sample_card.class_names,
        input_size=32, resize_size=32, interpolation="bilinear", mean=sample_card.mean, std=sample_card.std,
        top1=99.5, dataset="digits test", source="this test", shortcut="A")
    listed = (*known_weights(), entry)
    monkeypatch.setattr(known_module, "known_weights", lambda: listed)
    return path


def _eval_accuracy(*args):
    result = invoke("eval", *args, "--dataset", "sample", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["accuracy"]


@pytest.mark.slow
def test_a_recognised_file_gets_its_publishers_card_with_no_flag(recognised_copy, sample_model):
    result = invoke("validate", "-m", recognised_copy, "--dataset", "sample", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recognised"]["publisher"] == "example.org/cifar-digits"
    assert report["recognised"]["top1"] == 99.5 and report["accuracy"] > 0.99
    assert any(p["severity"] == "info" and p["code"] == "recognised" for p in report["problems"])
    shown = " ".join(invoke("validate", "-m", recognised_copy, "--dataset", "sample").stdout.split())
    assert "recognised example.org/cifar-digits resnet20-digits" in shown
    assert "published 99.5 % on digits test" in shown  # the measured figure beside the published one
    # eval uses the publisher's preprocessing: the same answers as the original with its own card
    assert _eval_accuracy("-m", recognised_copy) == _eval_accuracy("-m", sample_model)


@pytest.mark.slow
def test_flags_win_over_recognised_weights(recognised_copy):
    with_flags = _eval_accuracy("-m", recognised_copy, "--mean", "0.9,0.9,0.9", "--std", "0.1,0.1,0.1")
    assert with_flags < _eval_accuracy("-m", recognised_copy)
    info = json.loads(invoke("info", "-m", recognised_copy, "--json").stdout)
    assert tuple(info["card"]["class_names"]) == tuple(str(i) for i in range(10))


def test_an_unlisted_copy_falls_back_to_the_preset(tmp_path, sample_model):
    path = tmp_path / "unlisted.pt"
    shutil.copy(sample_model, path)
    report = json.loads(invoke("validate", "-m", path, "--json").stdout)
    assert report["recognised"] is None and report["card"]["mean"] == [0.4914, 0.4822, 0.4465]


@pytest.mark.slow
def test_an_onnx_exported_from_a_recognised_file_carries_that_card(recognised_copy, sample_card):
    from toolkit.runtime.registry import read_artifact

    out = recognised_copy.with_suffix(".onnx")
    result = invoke("export", "-m", recognised_copy, "-o", out, "--calib-dataset", "sample")
    assert result.exit_code == 0, result.output
    card, _ = read_artifact(out)
    assert (card.mean, card.std) == (sample_card.mean, sample_card.std)
