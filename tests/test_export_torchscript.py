"""TorchScript export: traced, frozen, card inside; loads back and agrees with eager PyTorch."""

from __future__ import annotations

import warnings
import zipfile

import pytest

from export import torchscript
from test_export_onnx import assert_close, eager, inputs, random_net
from toolkit.runtime.registry import detect_format, open_model
from toolkit.runtime.torchscript_runner import TorchScriptRunner

CASES = [
    pytest.param("resnet20", 32, id="cifar-resnet20"),
    pytest.param("resnet18", 64, id="resnet18", marks=pytest.mark.slow),
    pytest.param("resnext29_32x4d", 32, id="cifar-resnext29", marks=pytest.mark.slow),
    pytest.param("resnet50", 64, id="resnet50", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 64, id="resnext50", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "size"), CASES)
def test_torchscript_round_trip(tmp_path, arch, size):
    model, card = random_net(arch, size)
    path = torchscript.export(model, card, tmp_path / "m.ts")
    assert detect_format(path) == "torchscript"
    with open_model(path) as runner:
        assert isinstance(runner, TorchScriptRunner)
        assert runner.card == card
        for n in (1, 7):
            batch = inputs(card, n)
            assert_close(runner(batch), eager(model, batch))
    assert [p.name for p in tmp_path.iterdir()] == ["m.ts"]


@pytest.mark.slow
def test_card_lives_in_extra_files(tmp_path):
    model, card = random_net("resnet20", 32)
    path = torchscript.export(model, card, tmp_path / "m.ts")
    with zipfile.ZipFile(path) as archive:
        assert any(name.endswith("extra/card.json") for name in archive.namelist())


def test_corrupt_torchscript_is_a_model_format_error(tmp_path):
    from toolkit.errors import ModelFormatError

    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFormatError, match="TorchScript"):
        TorchScriptRunner.open(bad)


@pytest.mark.slow
def test_export_and_load_show_no_upstream_deprecation_warning(tmp_path):
    """torch.jit is deprecated upstream (FutureWarning on trace, script, save and load): the user asked for
    TorchScript and gets it, without the warning wall (issue 21); the README names the successor."""
    model, card = random_net("resnet20", 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = torchscript.export(model, card, tmp_path / "m.ts")
        with open_model(path) as runner:
            runner(inputs(card, 2))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []

