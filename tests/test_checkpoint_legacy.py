"""Checkpoints as old PyTorch code wrote them load as PyTorch itself loads them, and say so.

The reference is PyTorch: `load_state_dict(strict=True)` fills BatchNorm's `num_batches_tracked` for
modules saved before PyTorch 0.4.1 (torch/nn/modules/batchnorm.py `_load_from_state_dict`), and
`torch.load(map_location="cpu")` reads storages saved on a GPU. The toolkit accepts exactly that.
"""

from __future__ import annotations

import argparse
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from support.weights import perturb_batchnorm_
from toolkit.archs import build_model
from toolkit.checkpoint import infer_architecture, load_checkpoint, load_strict
from toolkit.errors import ArchitectureError, CheckpointError
from toolkit.runtime.registry import open_model

CPU_LOCATION = b"X\x03\x00\x00\x00cpu"  # pickle protocol 2: BINUNICODE, 4-byte length, "cpu"
CUDA_LOCATION = b"X\x06\x00\x00\x00cuda:0"


def pytorch_03_checkpoint(path, arch: str = "resnet20") -> nn.Module:
    """What a PyTorch 0.3 training script saved: DataParallel's `module.` prefix, no num_batches_tracked,
    no `_metadata` (module versions came with 0.4), the best accuracy beside the weights, pre-1.6 format."""
    model = perturb_batchnorm_(build_model(arch, 10))
    parallel = nn.DataParallel(model)  # on the CPU it only wraps: the prefix is all it adds
    state = OrderedDict((k, v) for k, v in parallel.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    torch.save({"state_dict": state, "best_prec1": 91.73, "epoch": 200, "arch": arch}, path,
               _use_new_zipfile_serialization=False)
    return model


@pytest.mark.slow
def test_a_pytorch_03_checkpoint_loads_and_says_so(tmp_path):
    model = pytorch_03_checkpoint(tmp_path / "resnet20-old.th")
    ckpt = load_checkpoint(tmp_path / "resnet20-old.th")
    notes = dict(ckpt.notes)
    assert notes["num_batches_tracked"] == ("19 BatchNorm counters missing (saved before PyTorch 0.4.1); "
                                            "filled in as PyTorch's own load does")
    assert "pre-1.6 format" in notes["legacy_format"]
    assert ckpt.recorded == {"best_prec1": 91.73, "epoch": 200, "arch": "resnet20"}
    assert (ckpt.prefix, ckpt.wrapper, ckpt.source) == ("module.", "state_dict", "torch")
    with open_model(tmp_path / "resnet20-old.th") as runner:
        x = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            assert np.abs(runner(x.numpy()) - model(x).numpy()).max() <= 1e-5


@pytest.mark.slow
def test_the_validate_report_shows_the_notes_and_the_record(tmp_path):
    from toolkit.validate import validate_checkpoint

    pytorch_03_checkpoint(tmp_path / "old.th")
    report = validate_checkpoint(tmp_path / "old.th")
    assert report.valid, report.problems
    codes = {p.code for p in report.problems}
    assert {"num_batches_tracked", "legacy_format"} <= codes


@pytest.mark.parametrize("version", [None, 1, 2])
def test_counters_are_filled_exactly_where_pytorch_fills_them(tmp_path, version):
    """Saved module version None/1 (before 0.4.1): filled; version 2: a missing counter stays missing."""
    model = perturb_batchnorm_(build_model("resnet20", 10))
    state = model.state_dict()
    del state["bn1.num_batches_tracked"]
    if version is None:
        del state._metadata
    else:
        state._metadata["bn1"]["version"] = version
    torch.save(state, tmp_path / "w.pt")
    try:
        build_model("resnet20", 10).load_state_dict(torch.load(tmp_path / "w.pt"), strict=True)
        torch_accepts = True
    except RuntimeError:
        torch_accepts = False
    ckpt = load_checkpoint(tmp_path / "w.pt")
    try:
        load_strict(build_model("resnet20", 10), ckpt.state_dict)
        toolkit_accepts = True
    except ArchitectureError:
        toolkit_accepts = False
    assert toolkit_accepts == torch_accepts == (version != 2)
    assert ("num_batches_tracked" in dict(ckpt.notes)) == (version != 2)


def _on_cuda(data: bytes) -> bytes:
    assert data.count(CPU_LOCATION) == 1  # one location string, memoised for every storage
    return data.replace(CPU_LOCATION, CUDA_LOCATION)


@pytest.mark.parametrize("zipped", [False, True])
def test_storages_saved_on_a_gpu_load_on_the_cpu(tmp_path, zipped):
    """Rewrite the storages' location to "cuda:0", as a file saved from a GPU carries it (no GPU needed)."""
    model = perturb_batchnorm_(build_model("resnet20", 10))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "cpu.pt", _use_new_zipfile_serialization=zipped)
    if zipped:
        with zipfile.ZipFile(tmp_path / "cpu.pt") as source, zipfile.ZipFile(tmp_path / "gpu.pt", "w") as out:
            for name in source.namelist():
                data = source.read(name)
                out.writestr(name, _on_cuda(data) if name.endswith("data.pkl") else data)
    else:
        (tmp_path / "gpu.pt").write_bytes(_on_cuda((tmp_path / "cpu.pt").read_bytes()))
    if not torch.cuda.is_available():  # the file really asks for a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    ckpt = load_checkpoint(tmp_path / "gpu.pt")
    assert dict(ckpt.notes)["storage_location"] == "tensors were saved on cuda:0; loaded onto the CPU"
    assert all(v.device.type == "cpu" for v in ckpt.state_dict.values())
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("container", ["torch", "safetensors"])
def test_half_and_double_precision_weights_load_and_are_reported(tmp_path, dtype, container):
    from safetensors.torch import save_file

    model = perturb_batchnorm_(build_model("resnet20", 10))
    stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / f"w.{'safetensors' if container == 'safetensors' else 'pt'}"
    save_file(stored, path) if container == "safetensors" else torch.save(stored, path)
    ckpt = load_checkpoint(path)
    name = str(dtype).replace("torch.", "")
    # 97 floating tensors: 19 BatchNorms x 4, 19 convolutions, the head's weight and bias
    assert dict(ckpt.notes)["stored_dtype"] == f"weights stored as {name} (97 tensors): computed in float32"
    reference = build_model("resnet20", 10)  # what load_state_dict makes of the same tensors
    reference.load_state_dict(stored)
    with open_model(path) as runner:
        x = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            assert np.abs(runner(x.numpy()) - reference(x).numpy()).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_other_floating_types_get_one_line(tmp_path, dtype):
    from toolkit.validate import validate_checkpoint

    state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
             for k, v in build_model("resnet20", 10).state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=rf"is stored as {dtype}; weights load from float32"):
        load_checkpoint(tmp_path / "w.pt")
    report = validate_checkpoint(tmp_path / "w.pt")  # a report, no traceback
    assert not report.valid and dtype in report.problems[0].message


@pytest.mark.slow
def test_training_script_records(tmp_path):
    """pytorch/examples' ImageNet script saves best_acc1 as a tensor; timm's train.py saves its argparse
    Namespace (plain data: allowed without --allow-pickle) and `metric`."""
    state = build_model("resnet18", 5).state_dict()
    torch.save({"state_dict": state, "best_acc1": torch.tensor(76.1), "epoch": 90, "arch": "resnet18",
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "examples.pth.tar")
    assert load_checkpoint(tmp_path / "examples.pth.tar").recorded == pytest.approx(
        {"best_acc1": 76.1, "epoch": 90, "arch": "resnet18"})
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state, "metric": 71.5, "version": 2,
                "args": argparse.Namespace(model="resnet18", lr=0.1)}, tmp_path / "model_best.pth.tar")
    ckpt = load_checkpoint(tmp_path / "model_best.pth.tar")
    assert ckpt.recorded == {"epoch": 3, "arch": "resnet18", "metric": 71.5}
    assert infer_architecture(ckpt.state_dict).arch == "resnet18"
