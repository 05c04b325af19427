"""Model folders: a Triton model folder, or the weights and config.json that timm and transformers write.

`timm.models.save_for_hf` writes `config.json` (`architecture`, `num_classes`, `label_names`,
`pretrained_cfg`) beside `model.safetensors` and/or `pytorch_model.bin` (timm/models/_hub.py);
transformers' `save_pretrained` writes `config.json` (`model_type`, `architectures`, `id2label`, ...)
beside `model.safetensors`, and the image processor's `save_pretrained` adds
`preprocessor_config.json`. A folder is whichever its files say; both libraries prefer the
safetensors file when both weights files are present, and so do we.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..card import load_json_bounded
from ..errors import CheckpointError, ModelFormatError
from ..paths import read_bytes_bounded

FolderKind = Literal["triton", "timm", "transformers"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TRITON_CONFIG = "config.pbtxt"
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_CONFIG_BYTES = 64 * 1024 * 1024  # an ImageNet-22k config with label names and descriptions fits
MAX_CONFIG_DEPTH = 32
LOOKED_FOR = (f"{TRITON_CONFIG} (a Triton model folder) or {CONFIG_FILE} with {' or '.join(WEIGHT_FILES)} "
              "(a timm or Hugging Face transformers folder)")


@dataclass(frozen=True)
class LibraryConfig:
    """The config files a library wrote beside the weights."""

    kind: Literal["timm", "transformers"]
    folder: Path
    config: Mapping[str, Any]
    preprocessor: Mapping[str, Any] | None = None  # transformers' image processor settings


def read_json(path: Path) -> dict[str, Any]:
    data = read_bytes_bounded(path, MAX_CONFIG_BYTES, error=CheckpointError, what=path.name)
    value = load_json_bounded(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH, what=str(path),
                              error=CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def config_kind(config: Mapping[str, Any]) -> Literal["timm", "transformers"] | None:
    """transformers always writes `model_type`; timm writes `architecture` and `pretrained_cfg`."""
    if isinstance(config.get("model_type"), str):
        return "transformers"
    if isinstance(config.get("architecture"), str) and isinstance(config.get("pretrained_cfg", {}), Mapping):
        return "timm"
    return None


def _is_triton(folder: Path) -> bool:
    """A model folder, or a repository holding one (as registry.triton_model_file accepts)."""
    if (folder / TRITON_CONFIG).is_file():
        return True
    return any(child.is_dir() and (child / TRITON_CONFIG).is_file() for child in folder.iterdir())


def _classify(folder: Path) -> tuple[FolderKind, dict[str, Any] | None]:
    """The folder's kind and, for timm/transformers, its config.json."""
    if _is_triton(folder):
        return "triton", None
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFormatError(f"{folder}: not a model folder; looked for {LOOKED_FOR}")
    config = read_json(config_path)
    kind = config_kind(config)
    if kind is None:
        raise ModelFormatError(f"{folder}: its {CONFIG_FILE} is neither timm's (architecture, "
                               "pretrained_cfg) nor transformers' (model_type)")
    return kind, config


def folder_kind(folder: Path) -> FolderKind:
    """Which kind of model folder `folder` is, from its files; ModelFormatError naming what was looked for."""
    return _classify(folder)[0]


def open_folder(folder: Path) -> tuple[Path, LibraryConfig]:
    """(weights file, its library's config) of a timm or transformers folder."""
    kind, config = _classify(folder)
    if kind == "triton" or config is None:
        raise ModelFormatError(f"{folder} is a Triton model folder ({TRITON_CONFIG}), not a checkpoint")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        sharded = [name for name in SHARD_INDEXES if (folder / name).is_file()]
        if sharded:
            raise CheckpointError(f"{folder}: sharded weights ({sharded[0]}) are not supported; a ResNet "
                                  "fits one file (save with a larger max_shard_size)")
        raise CheckpointError(f"{folder}: a {kind} folder without weights; looked for "
                              f"{', '.join(WEIGHT_FILES)}")
    return weights, library_config(folder, kind, config)


def library_beside(weights: Path) -> LibraryConfig | None:
    """The timm/transformers config in the folder of `model.safetensors`/`pytorch_model.bin` given as -m.

    Only the libraries' own file names qualify: a `best.pth` beside an unrelated config.json keeps
    its own meaning.
    """
    config_path = weights.parent / CONFIG_FILE
    if weights.name not in WEIGHT_FILES or not config_path.is_file():
        return None
    config = read_json(config_path)
    kind = config_kind(config)
    return library_config(weights.parent, kind, config) if kind is not None else None


def library_config(folder: Path, kind: Literal["timm", "transformers"],
                   config: Mapping[str, Any]) -> LibraryConfig:
    preprocessor = None
    if kind == "transformers" and (folder / PREPROCESSOR_FILE).is_file():
        preprocessor = read_json(folder / PREPROCESSOR_FILE)
    return LibraryConfig(kind, folder, config, preprocessor)
