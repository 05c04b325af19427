"""Safe checkpoint loading, unwrapping and key normalisation; the one strict load.

Loading is `weights_only=True` unless the user explicitly allows pickled code; a checkpoint that
needs code is refused before any of it runs. A checkpoint is a file (torch.save, either format, or
safetensors) or a folder timm or transformers wrote (config.json beside the weights). Whatever the
wrapper (a training script's dict, DataParallel's `module.`, Lightning's `model.`) and the layout
(torchvision/timm names, akamaster's CIFAR names, transformers' names), the result is a state_dict
under torchvision's names that the toolkit's network loads with `strict=True`, plus what was learned
on the way: the card fields the library's config states, notes and what the script recorded.
Architecture inference lives in toolkit/arch_inference.py (re-exported here).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arch_inference import (  # re-exported: callers import them from here
    DEEP_STEM_KEY,
    STEM_KEY,
    ArchInfo,
    infer_architecture,
    resolve_architecture,
)
from .card import ModelCard
from .checkpoint_formats import hf_resnet, timm_cfg
from .checkpoint_formats.folders import LibraryConfig, folder_kind, library_beside, open_folder
from .checkpoint_formats.reading import embedded_card, read_weights_file
from .checkpoint_formats.state import check_dtypes, fill_bn_counters, module_metadata, recorded_extras
from .errors import ArchitectureError, CheckpointError
from .paths import require_file_or_dir

__all__ = [
    "ArchInfo", "FitReport", "LoadedCheckpoint", "distinct_values", "file_sha256", "fit_report",
    "folder_kind", "infer_architecture", "load_checkpoint", "load_strict", "resolve_architecture",
]

# Wrapper keys in the order we prefer them (non-EMA first, as timm does by default).
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "model_ema", "state_dict_ema", "ema")
CARD_KEY = "toolkit_card"
STEM_KEYS = (STEM_KEY, DEEP_STEM_KEY, hf_resnet.STEM_KEY)
# Renames from third-party CIFAR layouts onto the torchvision names our networks use:
# akamaster/pytorch_resnet_cifar10 (and kuangliu) call the head `linear` and the shortcut `shortcut`.
_LAYOUT_RENAMES = ((re.compile(r"^linear\."), "fc."), (re.compile(r"\.shortcut\."), ".downsample."))
Note = tuple[str, str]


@dataclass
class LoadedCheckpoint:
    """A state_dict ready for `load_state_dict`, plus what we learned while unwrapping it."""

    path: Path  # the weights file (inside the folder, for a timm/transformers folder)
    state_dict: dict[str, Any]
    sha256: str  # of the weights file
    wrapper: str | None = None  # the dict key the weights were found under
    prefix: str = ""  # the module prefix that was stripped ("module.", "model.", ...)
    layout: str = "torchvision"  # "torchvision", "timm", "akamaster" or "transformers" tensor names
    dropped_keys: list[str] = field(default_factory=list)  # keys outside the network (e.g. a loss)
    card: ModelCard | None = None  # a card embedded in the checkpoint, if any
    pickled_module: bool = False
    config: dict[str, Any] | None = None  # card fields the library's own config states (ModelCard names)
    source: str = "torch"  # who wrote it: "torch", "safetensors", "timm" or "transformers"
    notes: list[Note] = field(default_factory=list)  # (code, message) facts worth showing as info
    recorded: dict[str, Any] = field(default_factory=dict)  # accuracy, epoch, arch saved beside the weights
    folder: Path | None = None  # the timm/transformers folder given, if any


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Read, unwrap and normalise a checkpoint file or a timm/transformers folder.

    Raises CheckpointError (unreadable), ArchitectureError (not a supported ResNet) or, for a folder
    that is neither timm's nor transformers', ModelFormatError naming what was looked for.
    """
    given = require_file_or_dir(path, error=CheckpointError, what="checkpoint")  # not a device or a FIFO
    library: LibraryConfig | None
    if given.is_dir():
        weights, library = open_folder(given)
    else:
        weights, library = given, library_beside(given)
    if library is None:
        return _read(weights, allow_pickle, configured=False)
    with _named_by(library):
        if library.kind == "transformers":  # before the weights: a ConvNext folder is refused as such
            hf_resnet.check_config(library.config)
        ckpt = _read(weights, allow_pickle, configured=True)
        ckpt.folder = given if given.is_dir() else None
        _apply_library(ckpt, library)
    return ckpt


def _read(weights: Path, allow_pickle: bool, *, configured: bool) -> LoadedCheckpoint:
    """One weights file: read, unwrap, check, complete (BatchNorm counters), rename, strip the prefix.

    `configured`: the library's config.json comes with it (else transformers' strides are assumed).
    """
    raw = read_weights_file(weights, allow_pickle)
    found, wrapper, embedded, pickled = _unwrap(raw.data, weights)
    tensors = dict(found)
    _check_tensors(tensors, weights)
    notes = [*raw.notes, *check_dtypes(tensors, weights)]
    notes += fill_bn_counters(tensors, module_metadata(found), raw.source)
    layout = "transformers" if hf_resnet.is_transformers_layout(tensors) else None
    if layout == "transformers":  # before the prefix is found: it precedes the stem's new name
        tensors = hf_resnet.to_torchvision_names(tensors)
    if layout == "transformers" and not configured:
        notes.append(("assumed_config", "transformers weights without their config.json: strides assumed "
                                        "at transformers' defaults (the tensors cannot show them)"))
    state, prefix, dropped = _strip_prefix(tensors, weights)
    if layout is None:
        state, layout = _rename_layout(state)
    return LoadedCheckpoint(
        path=weights, state_dict=state, sha256=file_sha256(weights), wrapper=wrapper, prefix=prefix,
        layout=layout, dropped_keys=dropped,
        card=raw.card or embedded, pickled_module=pickled,
        source="transformers" if layout == "transformers" else raw.source, notes=notes,
        recorded=recorded_extras(raw.data if wrapper else None),
    )


@contextmanager
def _named_by(library: LibraryConfig) -> Iterator[None]:
    """An architecture refusal names the model the library's config says it is."""
    try:
        yield
    except ArchitectureError as exc:
        named = (f"timm {timm_cfg.architecture_name(library.config)!r}" if library.kind == "timm"
                 else f"transformers {library.config.get('model_type')!r}")
        raise ArchitectureError(f"{library.folder} ({named}): {exc}") from None


def _apply_library(ckpt: LoadedCheckpoint, library: LibraryConfig) -> None:
    """Check the architecture the config names and take the card fields it states."""
    info = infer_architecture(ckpt.state_dict)
    if library.kind == "timm":
        timm_cfg.check_architecture(library.config, info.spec)
        fields, notes = timm_cfg.card_fields(library.config, info.num_classes)
    else:
        fields, notes = hf_resnet.card_fields(library.config, library.preprocessor, info.num_classes)
    ckpt.source, ckpt.config = library.kind, fields
    ckpt.notes += notes


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


def _unwrap(raw: Any, path: Path) -> tuple[Mapping[str, Any], str | None, ModelCard | None, bool]:
    """Find the tensors inside whatever the training script saved (the mapping itself, with its metadata)."""
    from torch import nn

    card = None
    if isinstance(raw, Mapping) and isinstance(raw.get(CARD_KEY), (Mapping, str)):
        card = embedded_card(raw[CARD_KEY], path)
    if isinstance(raw, nn.Module):
        return raw.state_dict(), None, card, True
    if isinstance(raw, Mapping):
        for key in WRAPPER_KEYS:
            value = raw.get(key)
            if isinstance(value, nn.Module):
                return value.state_dict(), key, card, True
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
    return any(isinstance(k, str) and k.endswith(STEM_KEYS) for k in mapping)


def _tensors_only(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tensors of `mapping`; the mapping itself when it holds nothing else (keeping its `_metadata`)."""
    import torch

    if all(isinstance(v, torch.Tensor) for v in mapping.values()):
        return mapping
    return {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict[str, Any], path: Path) -> tuple[dict[str, Any], str, list[str]]:
    """Remove wrapper prefixes (`module.`, `_orig_mod.`, Lightning's `model.`) in one pass.

    The stem convolution sits at the top of every ResNet, so whatever precedes `conv1.weight` (or
    timm's deep-stem `conv1.0.weight`) on the shortest such key is the prefix. Keys without it (a
    Lightning loss, metrics) are dropped.
    """
    stems = sorted(((k, stem) for k in state for stem in (STEM_KEY, DEEP_STEM_KEY)
                    if k.endswith(stem) and ".layer" not in k and not k.startswith("layer")),
                   key=lambda pair: len(pair[0]))
    if not stems:
        raise ArchitectureError(f"{path}: no stem convolution '{STEM_KEY}': not a ResNet/ResNeXt checkpoint")
    key, stem = stems[0]
    prefix = key[: -len(stem)]
    if prefix and not prefix.endswith("."):
        raise ArchitectureError(f"{path}: unexpected stem key {key!r}: not a ResNet/ResNeXt checkpoint")
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = sorted(k for k in state if not k.startswith(prefix))
    return kept, prefix, dropped


def _rename_layout(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """akamaster's CIFAR names onto torchvision's; else the names are torchvision's, or timm's superset
    of them (a deep stem `conv1.0...`, pooled shortcuts `downsample.2...`)."""
    if not any(k.startswith("linear.") or ".shortcut." in k for k in state):
        timm = DEEP_STEM_KEY in state or any(".downsample.2." in k for k in state)
        return state, "timm" if timm else "torchvision"
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _LAYOUT_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed, "akamaster"


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
