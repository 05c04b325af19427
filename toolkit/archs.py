"""Architecture registry: torchvision ResNet/ResNeXt/Wide-ResNet and the CIFAR family.

The registry is plain metadata so the CLI and architecture inference can use it without importing
torch; `build_model` imports torch only when a network is actually built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import ArchitectureError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

Family = Literal["resnet", "resnext", "wide_resnet"]
Stem = Literal["imagenet", "cifar"]
Block = Literal["basic", "bottleneck"]
SHORTCUTS = ("A", "B")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a network and to recognise it from its tensors."""

    name: str
    family: Family
    stem: Stem
    block: Block
    layers: tuple[int, ...]
    groups: int = 1
    width_per_group: int = 64
    paper_params_m: float | None = None  # parameter count (millions) reported by the paper

    @property
    def depth(self) -> int:
        per_block = 2 if self.block == "basic" else 3
        return per_block * sum(self.layers) + 2

    @property
    def has_shortcut_option(self) -> bool:
        """Only CIFAR basic-block nets come in the paper's option A (zero-pad) and B (1x1 conv)."""
        return self.stem == "cifar" and self.block == "basic"


def _torchvision_specs() -> list[ArchSpec]:
    b, k = "basic", "bottleneck"
    rows = [
        ("resnet18", "resnet", b, (2, 2, 2, 2), 1, 64),
        ("resnet34", "resnet", b, (3, 4, 6, 3), 1, 64),
        ("resnet50", "resnet", k, (3, 4, 6, 3), 1, 64),
        ("resnet101", "resnet", k, (3, 4, 23, 3), 1, 64),
        ("resnet152", "resnet", k, (3, 8, 36, 3), 1, 64),
        ("resnext50_32x4d", "resnext", k, (3, 4, 6, 3), 32, 4),
        ("resnext101_32x8d", "resnext", k, (3, 4, 23, 3), 32, 8),
        ("resnext101_64x4d", "resnext", k, (3, 4, 23, 3), 64, 4),
        ("wide_resnet50_2", "wide_resnet", k, (3, 4, 6, 3), 1, 128),
        ("wide_resnet101_2", "wide_resnet", k, (3, 4, 23, 3), 1, 128),
    ]
    return [ArchSpec(n, f, "imagenet", blk, lay, g, w) for n, f, blk, lay, g, w in rows]  # type: ignore[arg-type]


def _cifar_specs() -> list[ArchSpec]:
    # He et al. 2016, section 4.2: depth 6n+2, widths 16/32/64. Parameter counts from Table 6.
    paper = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
    specs = [
        ArchSpec(f"resnet{d}", "resnet", "cifar", "basic", ((d - 2) // 6,) * 3, paper_params_m=p)
        for d, p in paper.items()
    ]
    # Xie et al. 2017, Table 7: ResNeXt-29, three stages of three bottlenecks.
    for groups, width, params in ((8, 64, 34.4), (16, 64, 68.1), (32, 4, None)):
        specs.append(
            ArchSpec(f"resnext29_{groups}x{width}d", "resnext", "cifar", "bottleneck", (3, 3, 3),
                     groups, width, paper_params_m=params)
        )
    return specs


ARCHS: dict[str, ArchSpec] = {s.name: s for s in (*_torchvision_specs(), *_cifar_specs())}


def get_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def find_spec(stem: str, block: str, layers: tuple[int, ...], groups: int,
              width_per_group: int) -> ArchSpec | None:
    for spec in ARCHS.values():
        if (spec.stem, spec.block, spec.layers, spec.groups, spec.width_per_group) == (
            stem, block, layers, groups, width_per_group,
        ):
            return spec
    return None


def build_model(name: str, num_classes: int, shortcut: str | None = None) -> nn.Module:
    """A freshly initialised network in eval mode. `shortcut` applies to CIFAR basic-block nets."""
    spec = get_spec(name)
    if num_classes < 1:
        raise UsageError(f"num_classes must be positive, got {num_classes}")
    if spec.stem == "imagenet":
        import torchvision

        model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)
    else:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        from .cifar_nets import CifarResNet

        option = (shortcut or "A").upper() if spec.has_shortcut_option else "B"
        if option not in SHORTCUTS:
            raise ArchitectureError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        block = BasicBlock if spec.block == "basic" else Bottleneck
        model = CifarResNet(block, spec.layers, num_classes=num_classes, shortcut=option, groups=spec.groups,
                            width_per_group=spec.width_per_group)
    return model.eval()
