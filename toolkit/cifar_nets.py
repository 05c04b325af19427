"""CIFAR ResNets (He et al. 2016, section 4.2) and ResNeXt-29 (Xie et al. 2017).

Built from torchvision's own BasicBlock/Bottleneck so state-dict names match torchvision and
chenyaofo/pytorch-cifar-models exactly: conv1, bn1, layer{1,2,3}.{i}.conv*/bn*/downsample.{0,1}, fc.
`CifarResNet` takes plain arguments, as torchvision's `ResNet` does, so it knows nothing of the
architecture registry (toolkit/archs.py maps names to these arguments).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .resnet_variants import shortcut, stack_blocks


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))


class CifarResNet(nn.Module):
    """3x3 stem without max-pool, three stages at strides 1/2/2, global pool, linear head.

    Arguments follow torchvision's `ResNet(block, layers, num_classes, groups, width_per_group)`;
    `shortcut` is the paper's option "A" (zero-pad, basic blocks only) or "B" (1x1 conv).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], num_classes: int = 10,
                 shortcut: str = "A", groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        if len(layers) != 3:
            raise ValueError(f"CIFAR ResNets have three stages, got layers={list(layers)}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        stem_width = 16 if block is BasicBlock else 64
        planes = (16, 32, 64) if block is BasicBlock else (64, 128, 256)
        self.groups, self.base_width = groups, width_per_group
        self.shortcut = shortcut
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_stage(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_stage(block, planes[2], layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[2] * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != out_channels:
            if self.shortcut == "A" and block is BasicBlock:
                downsample = ZeroPadShortcut(self.inplanes, out_channels)
            else:
                downsample = shortcut(self.inplanes, out_channels, stride, avg_down=False)
        extra = {"groups": self.groups, "base_width": self.base_width} if block is Bottleneck else {}
        stage = stack_blocks(block, self.inplanes, planes, blocks, stride, downsample, **extra)
        self.inplanes = out_channels
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
