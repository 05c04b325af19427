"""ResNet-C/D/S/T: torchvision's blocks behind timm's deep stems and average-pool shortcuts.

He et al. 2019 ("Bag of Tricks for Image Classification with Convolutional Neural Networks",
section 4.1) replace the 7x7 stem convolution with three 3x3 ones (ResNet-C) and move the
shortcut's stride into a 2x2 average pool before its 1x1 convolution (ResNet-D). timm builds these
with the arguments `stem_type`, `stem_width` and `avg_down` (timm/models/resnet.py: `ResNet.__init__`
and `downsample_avg`); this network takes the same arguments and names its tensors as timm does, so
timm's state_dicts load with `strict=True`:

    conv1.{0,1,3,4,6}   deep stem: conv, bn, (relu), conv, bn, (relu), conv; then bn1 as usual
    layerN.0.downsample.{1,2}   avg_down shortcut: (pool or identity), 1x1 conv, bn

The blocks are torchvision's BasicBlock/Bottleneck: timm's stride the same convolution (the 3x3;
ResNet "v1.5") and compute `width = floor(planes * base_width / 64) * groups` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BlockType = type[BasicBlock] | type[Bottleneck]
STEM_TYPES = ("", "deep", "deep_tiered")


def stack_blocks(block: BlockType, inplanes: int, planes: int, blocks: int, stride: int,
                 downsample: nn.Module | None, **extra: Any) -> nn.Sequential:
    """One stage: the first block strides and carries the shortcut projection, the rest keep the shape."""
    out_channels = planes * block.expansion
    layers = [block(inplanes, planes, stride, downsample, **extra)]
    layers += [block(out_channels, planes, **extra) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def deep_stem(stem_type: str, stem_width: int, out_channels: int) -> nn.Sequential:
    """Three 3x3 convolutions (the first strides), BN+ReLU between them: timm's `conv1` Sequential."""
    first = 3 * (stem_width // 4) if stem_type == "deep_tiered" else stem_width
    return nn.Sequential(
        nn.Conv2d(3, first, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True),
        nn.Conv2d(first, stem_width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, out_channels, 3, stride=1, padding=1, bias=False),
    )


def shortcut(inplanes: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    """The projection shortcut: a strided 1x1 conv + BN, or (avg_down) 2x2 average pool, 1x1 conv, BN.

    The pool is timm's `nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`, and an
    Identity where the stage does not stride, so the conv is `downsample.1` in every stage.
    """
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, out_channels, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(out_channels))
    pool: nn.Module = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1
                       else nn.Identity())
    return nn.Sequential(pool, nn.Conv2d(inplanes, out_channels, 1, stride=1, bias=False),
                         nn.BatchNorm2d(out_channels))


class VariantResNet(nn.Module):
    """An ImageNet ResNet/ResNeXt with timm's stem and shortcut options (four stages, strides 1/2/2/2).

    Arguments follow timm's `ResNet(block, layers, num_classes, cardinality=groups,
    base_width=width_per_group, stem_width, stem_type, avg_down)`; with the defaults it is
    torchvision's ResNet.
    """

    def __init__(self, block: BlockType, layers: Sequence[int], num_classes: int = 1000, *, groups: int = 1,
                 width_per_group: int = 64, stem_type: str = "", stem_width: int = 64,
                 avg_down: bool = False) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ImageNet ResNets have four stages, got layers={list(layers)}")
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be one of {STEM_TYPES}, got {stem_type!r}")
        inplanes = stem_width * 2 if stem_type else 64
        self.conv1: nn.Module = (deep_stem(stem_type, stem_width, inplanes) if stem_type else
                                 nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False))
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        extra = {"groups": groups, "base_width": width_per_group} if block is Bottleneck else {}
        stages = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            out_channels = planes * block.expansion
            downsample = (shortcut(inplanes, out_channels, stride, avg_down)
                          if stride != 1 or inplanes != out_channels else None)
            stages.append(stack_blocks(block, inplanes, planes, blocks, stride, downsample, **extra))
            inplanes = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
