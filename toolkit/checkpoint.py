"""Safe checkpoint loading, unwrapping, key normalisation and architecture inference.

Loading is `weights_only=True` unless the user explicitly allows pickled code; a checkpoint that
needs code is refused before any of it runs. Architecture is inferred from tensor names and shapes
alone, so a bare state_dict is enough to rebuild the network.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archs import ARCHS, ArchSpec, find_spec, get_spec
from .card import MAX_CLASSES, ModelCard
from .errors import ArchitectureError, CheckpointError, DataError
from .paths import require_file

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
    path = require_file(path, error=CheckpointError, what="checkpoint")  # not a device or a FIFO
    sha = file_sha256(path)
    if path.suffix == ".safetensors" or _safetensors_content(path):  # decided by content, not only the name
        raw, card = _load_safetensors(path)
    else:
        raw, card = _load_torch(path, allow_pickle), None
    tensors, wrapper, embedded_card, pickled = _unwrap(raw, path)
    _check_tensors(tensors, path)
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
        with warnings.catch_warnings():  # torch's note on scanning sparse tensors; we refuse those anyway
            warnings.simplefilter("ignore", UserWarning)
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


def _safetensors_content(path: Path) -> bool:
    from .runtime.registry import is_safetensors_head

    with path.open("rb") as handle:
        return is_safetensors_head(handle.read(16))


def _load_safetensors(path: Path) -> tuple[dict[str, Any], ModelCard | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, _embedded_card(metadata.get(SAFETENSORS_CARD_KEY), path)


def _embedded_card(value: Any, path: Path) -> ModelCard | None:
    """The card a checkpoint carries (JSON text or a dict), checked like any other card."""
    if value is None:
        return None
    try:
        return ModelCard.from_json(value) if isinstance(value, (str, bytes)) else ModelCard.from_dict(value)
    except DataError as exc:
        raise CheckpointError(f"{path}: its embedded model card is unusable: {exc}") from None


def _check_tensors(state: Mapping[Any, Any], path: Path) -> None:
    """Names are strings and values dense real tensors, before any name or value is used."""
    import torch

    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: tensor names must be strings, "
                                  f"found {key!r} ({type(key).__name__})")
        if value.layout != torch.strided or value.is_quantized or value.is_meta or value.is_complex():
            kind = "quantized" if value.is_quantized else "meta" if value.is_meta else (
                "complex" if value.is_complex() else str(value.layout).replace("torch.", ""))
            raise CheckpointError(f"{path}: tensor {key!r} is {kind}; expected dense real-valued weights")


def distinct_values(tensor: Any) -> Any:
    """The tensor's values as stored, without the copies a view claims.

    A stride-0 view (`expand`) claims many elements over little storage: `fc.weight` of 10^9 x 64
    over one float. Reductions over such a view (isfinite, any) allocate the claimed size; over the
    span of storage it covers they cost what the file holds and see every value it can show.
    """
    if tensor.numel() == 0:
        return tensor
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    if span >= tensor.numel():
        return tensor
    return tensor.as_strided((span,), (1,))


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, Any], str | None, ModelCard | None, bool]:
    """Find the tensors inside whatever the training script saved."""
    from torch import nn

    card = None
    if isinstance(raw, Mapping) and isinstance(raw.get(CARD_KEY), (Mapping, str)):
        card = _embedded_card(raw[CARD_KEY], path)
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
    stems = sorted((k for k in state
                    if k.endswith(STEM_KEY) and ".layer" not in k and not k.startswith("layer")),
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
        raise ArchitectureError("no 2-D classifier head ('fc.weight' or 'linear.weight'): "
                                "not a ResNet/ResNeXt")
    num_classes = _num_classes(head)
    stem = "imagenet" if stem_weight.shape[-1] == 7 else "cifar"
    stage_blocks: list[int] = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.conv1\.weight$")
        indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        if not indices:
            break
        stage_blocks.append(max(indices) + 1)
    if not stage_blocks:
        raise ArchitectureError("no residual stages ('layer1.0.conv1.weight' ...): not a ResNet/ResNeXt")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    groups, width_per_group = 1, 64
    if block == "bottleneck":
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
        width_per_group = width * 64 // (stage_planes * groups)
    layers = tuple(stage_blocks)
    spec = find_spec(stem, block, layers, groups, width_per_group) or _nearest_spec(
        stem, block, layers, groups, width_per_group
    )
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


# --- the one strict load (validate, the torch runner, export, info) ------------------------------

@dataclass(frozen=True)
class FitReport:
    """How a state_dict fits a network: what is missing, unexpected, or has the wrong shape.

    Computed from names and shapes alone, before a single value is copied, so a damaged
    checkpoint (a conv of the wrong shape, a head claiming 10^9 classes) costs nothing to judge.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, listed: int = 10) -> list[tuple[str, str]]:
        """(code, message) pairs, the form validate reports them in."""
        out = []
        if self.missing:
            out.append(("missing_keys", f"{len(self.missing)} missing keys: {_listed(self.missing, listed)}"))
        if self.unexpected:
            out.append(("unexpected_keys",
                        f"{len(self.unexpected)} unexpected keys: {_listed(self.unexpected, listed)}"))
        out += [("shape_mismatch", f"{key}: expected {list(want)}, found {list(got)}")
                for key, want, got in self.mismatched]
        return out

    def message(self) -> str:
        shown = [message for _, message in self.problems(listed=5)]
        more = len(shown) - 4
        return "; ".join(shown[:4]) + (f"; ... (+{more} more shape mismatches)" if more > 0 else "")


def _listed(items: tuple[str, ...], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def fit_report(expected: Mapping[str, Any], found: Mapping[str, Any]) -> FitReport:
    """Compare a network's state_dict (`expected`) with the checkpoint's tensors by name and shape."""
    mismatched = tuple(
        (k, tuple(expected[k].shape), tuple(found[k].shape)) for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    )
    return FitReport(tuple(sorted(set(expected) - set(found))), tuple(sorted(set(found) - set(expected))),
                     mismatched)


def load_strict(model: Any, state: Mapping[str, Any]) -> FitReport:
    """Load `state` into `model` if it fits exactly; else ArchitectureError with the fit report."""
    report = fit_report(model.state_dict(), state)
    if not report.ok:
        raise ArchitectureError(f"weights do not fit {type(model).__name__}: {report.message()} "
                                "(run `toolkit validate` for the full report)")
    try:
        model.load_state_dict(dict(state), strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a dtype that cannot be copied
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(f"weights do not load: {reason}") from None
    return report
