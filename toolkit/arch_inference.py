"""What network the tensors describe: family, depth, width, stem, shortcut and head, from names and shapes.

A bare state_dict is enough to rebuild the network. The names are torchvision's (timm uses the
same, plus `conv1.{0,3,6}` for a deep stem and `downsample.{1,2}` behind an average pool);
checkpoint.py maps other layouts onto them first. Layers the toolkit's networks do not have
(squeeze-and-excitation, ECA and other attention, convolutional stem pools) are named and refused
here, before a strict load would only list them as unexpected keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .archs import ARCHS, ArchSpec, find_spec, get_spec
from .card import MAX_CLASSES
from .errors import ArchitectureError

STEM_KEY = "conv1.weight"
DEEP_STEM_KEY = "conv1.0.weight"  # timm's stem_type "deep"/"deep_tiered": conv1 is a Sequential
MAX_LISTED = 5

# Module names timm (and Cadene's pretrainedmodels) give layers a plain ResNet lacks, with what they are.
# timm/models/resnet.py: a block's attention is `se` (create_attn: SEModule fc1/fc2, EcaModule conv,
# CbamModule channel/spatial, ...), `aa` its anti-aliasing, `maxpool.N` a convolutional stem pool.
_FOREIGN_LAYERS = (
    (re.compile(r"^(.*\.(?:se|se_module))\.(?:fc1|fc2|conv_reduce|conv_expand)\."),
     "squeeze-and-excitation (SE)"),
    (re.compile(r"^(.*\.se)\.conv\."), "efficient channel attention (ECA)"),
    (re.compile(r"^(.*\.(?:se|attn|attention))\."), "attention"),
    (re.compile(r"^(.*\.aa)\."), "anti-aliasing (blur pool)"),
    (re.compile(r"^(maxpool)\."), "a convolutional stem pool (timm's replace_stem_pool)"),
)


@dataclass(frozen=True)
class ArchInfo:
    """What the tensors say the network is."""

    spec: ArchSpec
    num_classes: int
    shortcut: str | None

    @property
    def arch(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class _Stem:
    stem: str  # "imagenet" | "cifar"
    stem_type: str = ""
    stem_width: int = 64


def _conv(state: Mapping[str, Any], key: str) -> Any:
    tensor = state.get(key)
    if tensor is None or getattr(tensor, "ndim", 0) != 4:
        raise ArchitectureError(f"no 4-D '{key}' tensor: not a ResNet/ResNeXt")
    return tensor


def _stem(state: Mapping[str, Any]) -> _Stem:
    """A 7x7 convolution (ImageNet), a 3x3 one (CIFAR), or timm's three 3x3 convolutions (deep stem).

    timm's deep stems have widths (w, w, 2w), tiered ones (3*(w//4), w, 2w) (`ResNet.__init__`).
    """
    if DEEP_STEM_KEY not in state:
        return _Stem("imagenet" if _conv(state, STEM_KEY).shape[-1] == 7 else "cifar")
    first, middle, last = (int(_conv(state, f"conv1.{i}.weight").shape[0]) for i in (0, 3, 6))
    kinds = {middle: "deep", 3 * (middle // 4): "deep_tiered"}
    if last != 2 * middle or first not in kinds:
        raise ArchitectureError(f"a three-convolution stem of widths {first}, {middle}, {last} is neither "
                                "timm's deep (w, w, 2w) nor deep_tiered (3*(w//4), w, 2w) stem")
    return _Stem("imagenet", kinds[first], middle)


def foreign_layers(state: Mapping[str, Any]) -> dict[str, list[str]]:
    """{kind of layer: module names} for layers no toolkit network has (empty for a plain ResNet)."""
    found: dict[str, list[str]] = {}
    for key in state:
        for pattern, kind in _FOREIGN_LAYERS:
            if match := pattern.match(key):
                names = found.setdefault(kind, [])
                if match.group(1) not in names:
                    names.append(match.group(1))
                break
    return found


def _refuse_foreign(state: Mapping[str, Any]) -> None:
    found = foreign_layers(state)
    if not found:
        return
    parts = []
    for kind, names in found.items():
        more = f" ... (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
        parts.append(f"{kind} layers: {', '.join(names[:MAX_LISTED])}{more}")
    raise ArchitectureError("unsupported ResNet variant with " + "; ".join(parts) +
                            "; the toolkit builds plain ResNet/ResNeXt networks only")


def _stage_blocks(state: Mapping[str, Any]) -> tuple[int, ...]:
    blocks: list[int] = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.conv1\.weight$")
        indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        if not indices:
            break
        blocks.append(max(indices) + 1)
    if not blocks:
        raise ArchitectureError("no residual stages ('layer1.0.conv1.weight' ...): not a ResNet/ResNeXt")
    return tuple(blocks)


def _grouping(state: Mapping[str, Any]) -> tuple[int, int]:
    """(groups, width per group) of a bottleneck network, from the first block's 3x3 and last 1x1."""
    grouped = state.get("layer1.0.conv2.weight")  # (width, width / groups, 3, 3)
    expand = state["layer1.0.conv3.weight"]
    if grouped is None or getattr(grouped, "ndim", 0) != 4 or getattr(expand, "ndim", 0) != 4:
        raise ArchitectureError("no 4-D 'layer1.0.conv2.weight'/'layer1.0.conv3.weight': "
                                "not a ResNet/ResNeXt")
    width, per_group = int(grouped.shape[0]), int(grouped.shape[1])
    stage_planes = int(expand.shape[0]) // 4
    if min(width, per_group, stage_planes) < 1 or width % per_group:
        raise ArchitectureError(f"layer1.0.conv2.weight {list(grouped.shape)} and layer1.0.conv3.weight "
                                f"{list(expand.shape)} are not a ResNet/ResNeXt bottleneck")
    groups = width // per_group
    return groups, width * 64 // (stage_planes * groups)


def infer_architecture(state: Mapping[str, Any]) -> ArchInfo:
    """Family, depth, cardinality, width, stem, shortcut option and head size from tensors alone."""
    head = state.get("fc.weight")
    if STEM_KEY not in state and DEEP_STEM_KEY not in state:
        raise ArchitectureError(f"no 4-D '{STEM_KEY}' tensor: not a ResNet/ResNeXt")
    if head is None or getattr(head, "ndim", 0) != 2:
        raise ArchitectureError("no 2-D classifier head ('fc.weight' or 'linear.weight'): "
                                "not a ResNet/ResNeXt")
    _refuse_foreign(state)
    num_classes = _num_classes(head)
    stem = _stem(state)
    layers = _stage_blocks(state)
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    groups, width_per_group = _grouping(state) if block == "bottleneck" else (1, 64)
    projection = state.get("layer2.0.downsample.1.weight")  # a conv behind the pool, else the BN's scale
    avg_down = projection is not None and getattr(projection, "ndim", 0) == 4
    shape = (stem.stem, block, layers, groups, width_per_group, stem.stem_type, stem.stem_width, avg_down)
    spec = find_spec(*shape) or _nearest_spec(*shape)
    shortcut = None
    if spec.has_shortcut_option:
        shortcut = "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A"
    return ArchInfo(spec=spec, num_classes=num_classes, shortcut=shortcut)


def _num_classes(head: Any) -> int:
    """The head's output count, bounded: it sizes the network, the card and every report."""
    count = int(head.shape[0])
    if not 1 <= count <= MAX_CLASSES:
        raise ArchitectureError(f"the classifier head 'fc.weight' {list(head.shape)} claims {count} classes, "
                                f"outside 1..{MAX_CLASSES} (the limit on a model's classes)")
    return count


def _nearest_spec(stem: str, block: str, layers: tuple[int, ...], groups: int, wpg: int,
                  stem_type: str, stem_width: int, avg_down: bool) -> ArchSpec:
    """For damaged checkpoints (missing blocks), the registered arch they most resemble.

    Only architectures with the same stem, block, stage count, grouping and shortcut qualify, and
    each stage must be at least as deep as found, so strict loading then names the missing keys.
    """
    same = (stem, block, groups, wpg, stem_type, stem_width, avg_down)
    candidates = [
        s for s in ARCHS.values()
        if (s.stem, s.block, s.groups, s.width_per_group, s.stem_type, s.stem_width, s.avg_down) == same
        and len(s.layers) == len(layers) and all(a >= b for a, b in zip(s.layers, layers))
    ]
    if not candidates:
        stem_text = f"{stem_type} stem of width {stem_width}" if stem_type else f"{stem} stem"
        raise ArchitectureError(
            f"unsupported ResNet variant: {stem_text}, {block} blocks, stages {list(layers)}, "
            f"groups {groups}, width per group {wpg}{', average-pool shortcut' if avg_down else ''}; "
            f"supported: {', '.join(ARCHS)}"
        )
    return min(candidates, key=lambda s: sum(s.layers))


def resolve_architecture(state: Mapping[str, Any], arch: str | None = None,
                         shortcut: str | None = None) -> ArchInfo:
    """Inferred architecture, checked against `--arch`; a conflict shows both."""
    if arch in (None, "", "auto"):
        return infer_architecture(state)
    spec = get_spec(arch)
    try:
        inferred = infer_architecture(state)
    except ArchitectureError:
        head = state.get("fc.weight")
        if head is None or getattr(head, "ndim", 0) != 2:
            raise
        return ArchInfo(spec=spec, num_classes=_num_classes(head), shortcut=shortcut)
    if inferred.spec.name != spec.name:
        raise ArchitectureError(
            f"--arch {spec.name} conflicts with the weights, which look like {inferred.arch} "
            f"({inferred.spec.stem} stem, stages {list(inferred.spec.layers)}); drop --arch or fix it"
        )
    return ArchInfo(spec=spec, num_classes=inferred.num_classes, shortcut=shortcut or inferred.shortcut)
