"""Architecture registry: torchvision ResNet/ResNeXt/Wide-ResNet, timm's ResNet variants, the CIFAR family.

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
StemType = Literal["", "deep", "deep_tiered"]
SHORTCUTS = ("A", "B")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a network and to recognise it from its tensors.

    `stem_type`, `stem_width` and `avg_down` are timm's `ResNet` arguments of the same names
    (timm/models/resnet.py): "" is the single 7x7 convolution, "deep" three 3x3 convolutions of
    widths (w, w, 2w), "deep_tiered" (3*(w//4), w, 2w); `avg_down` puts a 2x2 average pool before
    the 1x1 shortcut convolution instead of striding it (the "D" tweak of He et al. 2019, "Bag of
    Tricks for Image Classification"). A deep stem is still an ImageNet stem (`stem="imagenet"`).
    """

    name: str
    family: Family
    stem: Stem
    block: Block
    layers: tuple[int, ...]
    groups: int = 1
    width_per_group: int = 64
    paper_params_m: float | None = None  # parameter count (millions) reported by the paper
    stem_type: StemType = ""
    stem_width: int = 64
    avg_down: bool = False

    @property
    def depth(self) -> int:
        per_block = 2 if self.block == "basic" else 3
        return per_block * sum(self.layers) + 2

    @property
    def has_shortcut_option(self) -> bool:
        """Only CIFAR basic-block nets come in the paper's option A (zero-pad) and B (1x1 conv)."""
        return self.stem == "cifar" and self.block == "basic"

    @property
    def is_variant(self) -> bool:
        """Built by toolkit.resnet_variants rather than torchvision (a deep stem or average-pool shortcut)."""
        return bool(self.stem_type) or self.avg_down

    @property
    def shape_key(self) -> tuple[object, ...]:
        """What the tensors can tell apart: two specs with equal keys are one network."""
        return (self.stem, self.block, self.layers, self.groups, self.width_per_group, self.stem_type,
                self.stem_width, self.avg_down)


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


# timm's variant letters (the ResNet docstring in timm/models/resnet.py): stem type, stem width, avg_down.
# "b" is torchvision's layout, so timm registers no `resnet50b`.
_TIMM_VARIANTS: dict[str, tuple[StemType, int, bool]] = {
    "": ("", 64, False),
    "c": ("deep", 32, False),
    "d": ("deep", 32, True),
    "s": ("deep", 64, False),
    "t": ("deep_tiered", 32, True),
}


def _timm_specs() -> list[ArchSpec]:
    """timm's plain-block ResNet/ResNeXt beyond torchvision's, under timm's `@register_model` names
    (timm/models/resnet.py, timm 1.0). Models with attention (SE, ECA, ...), anti-aliasing (blur or
    average pool), GroupNorm or other activations are deliberately absent."""
    b, k = "basic", "bottleneck"
    rows = [  # name, family, block, layers, groups, width per group, variant letter
        ("resnet10t", "resnet", b, (1, 1, 1, 1), 1, 64, "t"),
        ("resnet14t", "resnet", k, (1, 1, 1, 1), 1, 64, "t"),
        ("resnet18d", "resnet", b, (2, 2, 2, 2), 1, 64, "d"),
        ("resnet34d", "resnet", b, (3, 4, 6, 3), 1, 64, "d"),
        ("resnet26", "resnet", k, (2, 2, 2, 2), 1, 64, ""),
        ("resnet26d", "resnet", k, (2, 2, 2, 2), 1, 64, "d"),
        ("resnet26t", "resnet", k, (2, 2, 2, 2), 1, 64, "t"),
        ("resnet50c", "resnet", k, (3, 4, 6, 3), 1, 64, "c"),
        ("resnet50d", "resnet", k, (3, 4, 6, 3), 1, 64, "d"),
        ("resnet50s", "resnet", k, (3, 4, 6, 3), 1, 64, "s"),
        ("resnet50t", "resnet", k, (3, 4, 6, 3), 1, 64, "t"),
        ("resnet101c", "resnet", k, (3, 4, 23, 3), 1, 64, "c"),
        ("resnet101d", "resnet", k, (3, 4, 23, 3), 1, 64, "d"),
        ("resnet101s", "resnet", k, (3, 4, 23, 3), 1, 64, "s"),
        ("resnet152c", "resnet", k, (3, 8, 36, 3), 1, 64, "c"),
        ("resnet152d", "resnet", k, (3, 8, 36, 3), 1, 64, "d"),
        ("resnet152s", "resnet", k, (3, 8, 36, 3), 1, 64, "s"),
        ("resnet200", "resnet", k, (3, 24, 36, 3), 1, 64, ""),
        ("resnet200d", "resnet", k, (3, 24, 36, 3), 1, 64, "d"),
        ("resnext50d_32x4d", "resnext", k, (3, 4, 6, 3), 32, 4, "d"),
        ("resnext101_32x4d", "resnext", k, (3, 4, 23, 3), 32, 4, ""),
        ("resnext101_32x16d", "resnext", k, (3, 4, 23, 3), 32, 16, ""),
        ("resnext101_32x32d", "resnext", k, (3, 4, 23, 3), 32, 32, ""),
    ]
    specs = []
    for name, family, block, layers, groups, width, letter in rows:
        stem_type, stem_width, avg_down = _TIMM_VARIANTS[letter]
        specs.append(ArchSpec(name, family, "imagenet", block, layers, groups, width,  # type: ignore[arg-type]
                              stem_type=stem_type, stem_width=stem_width, avg_down=avg_down))
    return specs


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


ARCHS: dict[str, ArchSpec] = {s.name: s for s in (*_torchvision_specs(), *_timm_specs(), *_cifar_specs())}


def get_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def find_spec(stem: str, block: str, layers: tuple[int, ...], groups: int, width_per_group: int,
              stem_type: str = "", stem_width: int = 64, avg_down: bool = False) -> ArchSpec | None:
    key = (stem, block, tuple(layers), groups, width_per_group, stem_type, stem_width, avg_down)
    return next((spec for spec in ARCHS.values() if spec.shape_key == key), None)


def build_model(name: str, num_classes: int, shortcut: str | None = None) -> nn.Module:
    """A freshly initialised network in eval mode. `shortcut` applies to CIFAR basic-block nets."""
    spec = get_spec(name)
    if num_classes < 1:
        raise UsageError(f"num_classes must be positive, got {num_classes}")
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block = BasicBlock if spec.block == "basic" else Bottleneck
    model: nn.Module
    if spec.stem == "cifar":
        from .cifar_nets import CifarResNet

        option = (shortcut or "A").upper() if spec.has_shortcut_option else "B"
        if option not in SHORTCUTS:
            raise ArchitectureError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        model = CifarResNet(block, spec.layers, num_classes=num_classes, shortcut=option, groups=spec.groups,
                            width_per_group=spec.width_per_group)
    elif spec.is_variant:
        from .resnet_variants import VariantResNet

        model = VariantResNet(block, spec.layers, num_classes=num_classes, groups=spec.groups,
                              width_per_group=spec.width_per_group, stem_type=spec.stem_type,
                              stem_width=spec.stem_width, avg_down=spec.avg_down)
    else:  # what torchvision.models.resnet50(weights=None, ...) and friends build
        model = ResNet(block, list(spec.layers), num_classes=num_classes, groups=spec.groups,
                       width_per_group=spec.width_per_group)
    return model.eval()
