"""Safe checkpoint loading, unwrapping, key normalisation and architecture inference.

Loading is `weights_only=True` unless the user explicitly allows pickled code; a checkpoint that
needs code is refused before any of it runs. Architecture is inferred from tensor names and shapes
alone, so a bare state_dict is enough to rebuild the network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archs import ARCHS, ArchSpec, find_spec, get_spec
from .card import ModelCard
from .errors import ArchitectureError, CheckpointError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
# Wrapper keys in the order we prefer them (non-EMA first, as timm does by default).
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "model_ema", "state_dict_ema", "ema")
CARD_KEY = "toolkit_card"
SAFETENSORS_CARD_KEY = "toolkit.card"
STEM_KEY = "conv1.weight"
# Renames from third-party CIFAR layouts onto the torchvision names our networks use:
# akamaster/pytorch_resnet_cifar10 (and kuangliu) call the head `linear` and the shortcut `shortcut`.
_LAYOUT_RENAMES = ((re.compile(r"^linear\."), "fc."), (re.compile(r"\.shortcut\."), ".downsample."))


@dataclass
class LoadedCheckpoint:
    """A state_dict ready for `load_state_dict`, plus what we learned while unwrapping it."""

    path: Path
    state_dict: dict[str, Any]
    sha256: str
    wrapper: str | None = None  # the dict key the weights were found under
    prefix: str = ""  # the module prefix that was stripped ("module.", "model.", ...)
    layout: str = "torchvision"  # "torchvision" or "akamaster"
    dropped_keys: list[str] = field(default_factory=list)  # keys outside the network (e.g. a loss)
    card: ModelCard | None = None  # a card embedded in the checkpoint, if any
    pickled_module: bool = False


@dataclass(frozen=True)
class ArchInfo:
    """What the tensors say the network is."""

    spec: ArchSpec
    num_classes: int
    shortcut: str | None

    @property
    def arch(self) -> str:
        return self.spec.name


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Read, unwrap and normalise a checkpoint. Raises CheckpointError with an actionable message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sha = file_sha256(path)
    if path.suffix == ".safetensors":
        raw, card = _load_safetensors(path)
    else:
        raw, card = _load_torch(path, allow_pickle), None
    tensors, wrapper, embedded_card, pickled = _unwrap(raw, path)
    state, prefix, dropped = _strip_prefix(tensors, path)
    state, layout = _rename_layout(state)
    return LoadedCheckpoint(
        path=path, state_dict=state, sha256=sha, wrapper=wrapper, prefix=prefix, layout=layout,
        dropped_keys=dropped, card=card or embedded_card, pickled_module=pickled,
    )


def _load_torch(path: Path, allow_pickle: bool) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            raise CheckpointError(f"{path}: cannot unpickle: {exc}") from None
        raise CheckpointError(
            f"{path} carries pickled code or objects that a safe load refuses ({_unsafe_globals(path)}); "
            "nothing was executed. If you trust its source, rerun with --allow-pickle"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, ImportError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
        ) from None


def _unsafe_globals(path: Path) -> str:
    """Name what the pickle wants to import (read without executing it), for the refusal message."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        names = get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to enrich a message
        return "unknown objects"
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "unknown objects"


def _load_safetensors(path: Path) -> tuple[dict[str, Any], ModelCard | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    card = ModelCard.from_json(metadata[SAFETENSORS_CARD_KEY]) if SAFETENSORS_CARD_KEY in metadata else None
    return tensors, card


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, Any], str | None, ModelCard | None, bool]:
    """Find the tensors inside whatever the training script saved."""
    from torch import nn

    card = None
    if isinstance(raw, Mapping) and isinstance(raw.get(CARD_KEY), (dict, str)):
        value = raw[CARD_KEY]
        card = ModelCard.from_json(value) if isinstance(value, str) else ModelCard.from_dict(value)
    if isinstance(raw, nn.Module):
        return dict(raw.state_dict()), None, card, True
    if isinstance(raw, Mapping):
        for key in WRAPPER_KEYS:
            value = raw.get(key)
            if isinstance(value, nn.Module):
                return dict(value.state_dict()), key, card, True
            if isinstance(value, Mapping) and _has_stem(value):
                return _tensors_only(value), key, card, False
        if _has_stem(raw):
            return _tensors_only(raw), None, card, False
        keys = ", ".join(sorted(map(str, raw))[:8])
        raise ArchitectureError(
            f"{path}: no ResNet weights found (no '{STEM_KEY}' tensor); top-level keys: {keys}"
        )
    raise CheckpointError(f"{path}: expected a state_dict or a dict wrapping one, found {type(raw).__name__}")


def _has_stem(mapping: Mapping[Any, Any]) -> bool:
    return any(isinstance(k, str) and k.endswith(STEM_KEY) for k in mapping)


def _tensors_only(mapping: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict[str, Any], path: Path) -> tuple[dict[str, Any], str, list[str]]:
    """Remove wrapper prefixes (`module.`, `_orig_mod.`, Lightning's `model.`) in one pass.

    The stem convolution sits at the top of every ResNet, so whatever precedes `conv1.weight` on
    the shortest such key is the prefix. Keys without it (a Lightning loss, metrics) are dropped.
    """
    stems = sorted((k for k in state if k.endswith(STEM_KEY) and ".layer" not in k and not k.startswith("layer")),
                   key=len)
    if not stems:
        raise ArchitectureError(f"{path}: no stem convolution '{STEM_KEY}': not a ResNet/ResNeXt checkpoint")
    prefix = stems[0][: -len(STEM_KEY)]
    if prefix and not prefix.endswith("."):
        raise ArchitectureError(f"{path}: unexpected stem key {stems[0]!r}: not a ResNet/ResNeXt checkpoint")
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = sorted(k for k in state if not k.startswith(prefix))
    return kept, prefix, dropped


def _rename_layout(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if not any(k.startswith("linear.") or ".shortcut." in k for k in state):
        return state, "torchvision"
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _LAYOUT_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed, "akamaster"


# --- architecture inference -------------------------------------------------------------------

def infer_architecture(state: Mapping[str, Any]) -> ArchInfo:
    """Family, depth, cardinality, width, stem, shortcut option and head size from tensors alone."""
    stem_weight = state.get(STEM_KEY)
    head = state.get("fc.weight")
    if stem_weight is None or getattr(stem_weight, "ndim", 0) != 4:
        raise ArchitectureError(f"no 4-D '{STEM_KEY}' tensor: not a ResNet/ResNeXt")
    if head is None or head.ndim != 2:
        raise ArchitectureError("no 2-D classifier head ('fc.weight' or 'linear.weight'): not a ResNet/ResNeXt")
    stem = "imagenet" if stem_weight.shape[-1] == 7 else "cifar"
    stage_blocks: list[int] = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
        if not indices:
            break
        stage_blocks.append(max(indices) + 1)
    if not stage_blocks:
        raise ArchitectureError("no residual stages ('layer1.0.conv1.weight' ...): not a ResNet/ResNeXt")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    groups, width_per_group = 1, 64
    if block == "bottleneck":
        grouped = state["layer1.0.conv2.weight"]  # (width, width / groups, 3, 3)
        width, per_group = int(grouped.shape[0]), int(grouped.shape[1])
        groups = width // per_group
        stage_planes = int(state["layer1.0.conv3.weight"].shape[0]) // 4
        width_per_group = width * 64 // (stage_planes * groups)
    layers = tuple(stage_blocks)
    spec = find_spec(stem, block, layers, groups, width_per_group) or _nearest_spec(
        stem, block, layers, groups, width_per_group
    )
    shortcut = None
    if spec.has_shortcut_option:
        shortcut = "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A"
    return ArchInfo(spec=spec, num_classes=int(head.shape[0]), shortcut=shortcut)


def _nearest_spec(stem: str, block: str, layers: tuple[int, ...], groups: int, wpg: int) -> ArchSpec:
    """For damaged checkpoints (missing blocks), the registered arch they most resemble.

    Only architectures with the same stem, block, stage count and grouping qualify, and each stage
    must be at least as deep as found, so strict loading then names the missing keys.
    """
    candidates = [
        s for s in ARCHS.values()
        if (s.stem, s.block, s.groups, s.width_per_group) == (stem, block, groups, wpg)
        and len(s.layers) == len(layers) and all(a >= b for a, b in zip(s.layers, layers))
    ]
    if not candidates:
        raise ArchitectureError(
            f"unsupported ResNet variant: {stem} stem, {block} blocks, stages {list(layers)}, "
            f"groups {groups}, width per group {wpg}; supported: {', '.join(ARCHS)}"
        )
    return min(candidates, key=lambda s: sum(s.layers))


def resolve_architecture(state: Mapping[str, Any], arch: str | None = None, shortcut: str | None = None) -> ArchInfo:
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
        return ArchInfo(spec=spec, num_classes=int(head.shape[0]), shortcut=shortcut)
    if inferred.spec.name != spec.name:
        raise ArchitectureError(
            f"--arch {spec.name} conflicts with the weights, which look like {inferred.arch} "
            f"({inferred.spec.stem} stem, stages {list(inferred.spec.layers)}); drop --arch or fix it"
        )
    return ArchInfo(spec=spec, num_classes=inferred.num_classes, shortcut=shortcut or inferred.shortcut)
