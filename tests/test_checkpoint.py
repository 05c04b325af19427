"""Every architecture, in every wrapper and key layout users bring, is recognised from its tensors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from toolkit.archs import ARCHS, build_model
from toolkit.checkpoint import infer_architecture, load_checkpoint, resolve_architecture
from toolkit.errors import ArchitectureError, CheckpointError

NUM_CLASSES = 13


def cheap_state_dict(arch: str, shortcut: str | None = None) -> dict[str, torch.Tensor]:
    """Real key names and shapes; every tensor is a stride-0 view of one value, so even
    resnext101 saves to a few kilobytes and the test stays fast."""
    return dict(_cheap_state_dict(arch, shortcut))


@functools.cache
def _cheap_state_dict(arch: str, shortcut: str | None) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(arch, NUM_CLASSES, shortcut=shortcut)
    state = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        if value.ndim == 0:
            state[key] = torch.tensor(1, dtype=value.dtype)
        else:
            state[key] = torch.tensor([0.01 * (i + 1)], dtype=value.dtype).expand(value.shape)
    return state


def akamaster(state: dict) -> dict:
    """akamaster/pytorch_resnet_cifar10 names: `linear` head, `shortcut` for option-B convs."""
    out = {}
    for key, value in state.items():
        key = key.replace(".downsample.", ".shortcut.")
        out["linear." + key[3:] if key.startswith("fc.") else key] = value
    return out


# name -> (transform of a state_dict into what gets saved)
WRAPPERS: dict[str, Callable[[dict], object]] = {
    "plain": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 3, "best_prec1": 91.0},
    "model": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "model_ema": lambda s: {"model_ema": s},
    "state_dict_ema": lambda s: {"state_dict_ema": s},
    "net": lambda s: {"net": s, "acc": 93.0},
    "lightning": lambda s: {
        "state_dict": {**{f"model.{k}": v for k, v in s.items()}, "criterion.weight": torch.ones(3)},
        "pytorch-lightning_version": "2.4.0", "global_step": 10,
    },
    "dataparallel": lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    "torch_compile": lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
    "ddp_compile": lambda s: {f"module._orig_mod.{k}": v for k, v in s.items()},
}


def _arch_by_wrapper() -> list:
    """Every architecture bare (but the 1202-layer CIFAR net) and every wrapper around resnet50 in the
    fast lane; the whole product (420 checkpoints) marked slow, for `make test`."""
    fast = {(arch, "plain") for arch in ARCHS if arch != "resnet1202"} | {("resnet50", w) for w in WRAPPERS}
    return [pytest.param(arch, wrapper, marks=() if (arch, wrapper) in fast else pytest.mark.slow)
            for arch in sorted(ARCHS) for wrapper in sorted(WRAPPERS)]


@pytest.mark.parametrize(("arch", "wrapper"), _arch_by_wrapper())
def test_every_architecture_in_every_wrapper(tmp_path, arch, wrapper):
    path = tmp_path / "weights.pth"
    torch.save(WRAPPERS[wrapper](cheap_state_dict(arch)), path)
    ckpt = load_checkpoint(path)
    info = infer_architecture(ckpt.state_dict)
    assert (info.arch, info.num_classes) == (arch, NUM_CLASSES)
    assert set(ckpt.state_dict) == set(cheap_state_dict(arch))
    if wrapper == "lightning":
        assert ckpt.dropped_keys == ["criterion.weight"]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("layout", ["chenyaofo", "akamaster"])
def test_cifar_layouts_and_shortcut_option(tmp_path, depth, shortcut, layout):
    state = cheap_state_dict(f"resnet{depth}", shortcut)
    if layout == "akamaster":  # saved under DataParallel, as its trainer does
        saved = {"state_dict": {f"module.{k}": v for k, v in akamaster(state).items()}, "best_prec1": 92.0}
    else:
        saved = state
    torch.save(saved, tmp_path / "w.th")
    ckpt = load_checkpoint(tmp_path / "w.th")
    info = infer_architecture(ckpt.state_dict)
    assert (info.arch, info.shortcut, info.num_classes) == (f"resnet{depth}", shortcut, NUM_CLASSES)
    assert ckpt.layout == ("akamaster" if layout == "akamaster" else "torchvision")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnext29_32x4d", "resnet18"])
def test_safetensors(tmp_path, arch):
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in cheap_state_dict(arch).items()}
    save_file(state, tmp_path / "w.safetensors")
    info = infer_architecture(load_checkpoint(tmp_path / "w.safetensors").state_dict)
    assert (info.arch, info.num_classes) == (arch, NUM_CLASSES)


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": cheap_state_dict("resnet20"), "hook": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_whole_module_needs_allow_pickle(tmp_path):
    model = build_model("resnet20", NUM_CLASSES)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(tmp_path / "whole.pt")
    ckpt = load_checkpoint(tmp_path / "whole.pt", allow_pickle=True)
    assert ckpt.pickled_module and infer_architecture(ckpt.state_dict).arch == "resnet20"


def test_truncated_and_foreign_files(tmp_path):
    torch.save(cheap_state_dict("resnet20"), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text.pt")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(ArchitectureError, match="no ResNet weights"):
        load_checkpoint(tmp_path / "mlp.pt")


def test_arch_flag_conflict_shows_both():
    state = cheap_state_dict("resnet20")
    with pytest.raises(ArchitectureError, match=r"--arch resnet56 conflicts .* resnet20"):
        resolve_architecture(state, "resnet56")
    assert resolve_architecture(state, "resnet20").arch == "resnet20"


def test_damaged_checkpoint_maps_to_the_nearest_architecture():
    state = {k: v for k, v in cheap_state_dict("resnet20").items() if not k.startswith("layer3.2.")}
    assert infer_architecture(state).arch == "resnet20"  # so strict loading can name what is missing


@pytest.mark.parametrize("suffix", [".th", ".bin", ".tar"])
def test_suffix_does_not_decide_the_reader(tmp_path, suffix):
    """akamaster's released weights are `resnet20-12fca82f.th`; safetensors may be named `.bin`."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in build_model("resnet20", 10).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / f"pickled{suffix}")
    save_file(state, tmp_path / f"safe{suffix}")
    for name in ("pickled", "safe"):
        loaded = load_checkpoint(tmp_path / f"{name}{suffix}")
        assert infer_architecture(loaded.state_dict).arch == "resnet20"


def test_a_modern_file_has_nothing_to_note(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in build_model("resnet20", 10).state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name, source in (("w.pt", "torch"), ("w.safetensors", "safetensors")):
        ckpt = load_checkpoint(tmp_path / name)
        assert (ckpt.source, ckpt.config, ckpt.notes, ckpt.recorded) == (source, None, [], {})


def test_a_folder_is_what_its_files_say(tmp_path):
    """Triton model folders stay Triton's; timm/transformers folders are checkpoints; others say what was
    looked for."""
    import json

    from toolkit.errors import ModelFormatError
    from toolkit.runtime.registry import detect_format

    triton = tmp_path / "triton" / "resnet"
    (triton / "1").mkdir(parents=True)
    (triton / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (triton / "1" / "model.onnx").write_bytes(b"")
    assert detect_format(triton) == detect_format(triton.parent) == "onnx"
    with pytest.raises(ModelFormatError, match="is a Triton model folder"):
        load_checkpoint(triton)
    (tmp_path / "empty").mkdir()
    for call in (detect_format, load_checkpoint):
        with pytest.raises(ModelFormatError, match=r"not a model folder; looked for config\.pbtxt .*json"):
            call(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"lr": 0.1}))
    with pytest.raises(ModelFormatError, match=r"neither timm's .* nor transformers'"):
        detect_format(tmp_path / "other")
    timm_folder = tmp_path / "timm"
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text(json.dumps({"architecture": "resnet20", "pretrained_cfg": {}}))
    assert detect_format(timm_folder) == "checkpoint"
    with pytest.raises(CheckpointError, match=r"a timm folder without weights; looked for model\."):
        load_checkpoint(timm_folder)
    torch.save(build_model("resnet20", 10).state_dict(), timm_folder / "best.pth")
    assert load_checkpoint(timm_folder / "best.pth").config is None  # only the libraries' file names
