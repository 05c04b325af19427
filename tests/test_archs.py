from __future__ import annotations

import pytest
import torch

from toolkit.archs import ARCHS, build_model
from toolkit.checkpoint import infer_architecture


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# He et al. 2016 (Table 6) and Xie et al. 2017 (Table 7): parameter counts in millions.
@pytest.mark.parametrize("arch, paper", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                         ("resnet56", 0.85), ("resnet110", 1.7), ("resnet1202", 19.4),
                                         ("resnext29_8x64d", 34.4), ("resnext29_16x64d", 68.1)])
def test_cifar_parameter_counts_match_the_papers(arch, paper):
    with torch.device("meta"):
        model = build_model(arch, 10)
    assert n_params(model) == pytest.approx(paper, rel=0.02)


def test_option_a_has_no_shortcut_parameters_and_option_b_does():
    a, b = build_model("resnet20", 10, shortcut="A"), build_model("resnet20", 10, shortcut="B")
    assert not any("downsample" in k for k in a.state_dict())
    assert "layer2.0.downsample.0.weight" in b.state_dict()
    assert n_params(b) > n_params(a)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_builds_with_any_head_and_is_recognised(arch):
    with torch.device("meta"):
        model = build_model(arch, 37)
    info = infer_architecture(model.state_dict())
    assert info.arch == arch and info.num_classes == 37
    assert model.fc.out_features == 37


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("resnet20", 32), ("resnext29_32x4d", 32), ("resnet18", 64)])
def test_forward_gives_logits_per_class(arch, size):
    model = build_model(arch, 5)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.slow
def test_torchvision_names_match_torchvision():
    import torchvision

    ours = build_model("resnext50_32x4d", 10).state_dict()
    theirs = torchvision.models.resnext50_32x4d(num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_cifar_resnet_takes_plain_arguments_like_torchvision_resnet():
    """CifarResNet(block, layers, num_classes, groups, width_per_group) knows nothing of the registry."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from toolkit.cifar_nets import CifarResNet

    with torch.device("meta"):
        plain = CifarResNet(Bottleneck, [3, 3, 3], num_classes=7, shortcut="B", groups=32, width_per_group=4)
        registered = build_model("resnext29_32x4d", 7)
        resnet20 = CifarResNet(BasicBlock, (3, 3, 3), num_classes=10)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in registered.state_dict().items()}
    assert n_params(resnet20) == pytest.approx(0.27, rel=0.02)  # option A by default, as in the paper
    with pytest.raises(ValueError, match="three stages"):
        CifarResNet(BasicBlock, [2, 2, 2, 2])
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(BasicBlock, [3, 3, 3], shortcut="C")


@pytest.mark.slow
def test_variant_resnet_with_defaults_is_torchvisions_resnet():
    from torchvision.models.resnet import Bottleneck, ResNet

    from toolkit.resnet_variants import VariantResNet

    theirs = ResNet(Bottleneck, [1, 2, 1, 1], num_classes=6, groups=32, width_per_group=4).eval()
    ours = VariantResNet(Bottleneck, (1, 2, 1, 1), num_classes=6, groups=32, width_per_group=4).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("arch, stem, pooled", [
    ("resnet50d", (32, 32, 64), True), ("resnet50c", (32, 32, 64), False),
    ("resnet50s", (64, 64, 128), False), ("resnet26t", (24, 32, 64), True),
])
def test_timm_variant_stems_and_shortcuts(arch, stem, pooled):
    """He et al. 2019's ResNet-C/D stems (three 3x3 convs) and ResNet-D's average-pool shortcut."""
    with torch.device("meta"):
        model = build_model(arch, 10)
    assert tuple(model.conv1[i].out_channels for i in (0, 3, 6)) == stem
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], torch.nn.AvgPool2d) == pooled
    assert infer_architecture(model.state_dict()).arch == arch
    with torch.inference_mode():
        assert model(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 10)
