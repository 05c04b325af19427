"""What a server may load: model sources, read into one `VersionSpec` per version to serve.

Three sources meet one protocol (`names()`, `read(name)`):

- `RepositoryModels`: a Triton-layout repository (`toolkit export --format triton` writes one):
  `<name>/config.pbtxt`, `<name>/<version>/model.onnx|model.plan|model.pt`. The config's
  `max_batch_size`, `dynamic_batching` (delay, queue size, timeout), `instance_group` (count, kind) and
  `version_policy` are honoured as Triton honours them (`toolkit.triton_config.serving_settings`); a
  folder without config.pbtxt is served with the command line's settings, as Triton auto-completes one.
  `read` re-reads the folder every time: an explicit load picks up a new version or config.
- `FileModels`: `toolkit serve -m a.onnx -m b=b.int8.onnx`, one version "1" each, the command line's
  settings.
- `GivenRunner`: an opened Runner handed to `create_app` (tests, embedding); the caller keeps it.

Everything here is picklable (the inference process reads models for the workers) except GivenRunner,
which only a single-process server takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from toolkit import triton_config
from toolkit.runtime.base import Runner

from .config import ServeConfig
from .errors import ModelLoadError, UnknownModelError

# Triton's default model file per platform/backend, and what this server runs of them
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx", "tensorrt_plan": "model.plan",
               "tensorrt": "model.plan", "pytorch_libtorch": "model.pt", "pytorch": "model.pt"}
LATEST = {"latest": {"num_versions": 1}}


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served: what a request may carry and how its batcher gathers requests."""

    max_batch_size: int = 32  # images per request (0: the model does not batch; Triton's meaning)
    batching: bool = True  # gather concurrent requests into one runner call (Triton's dynamic_batching)
    max_delay_ms: float = 0.0
    max_queue: int = 256
    timeout_s: float = 30.0
    instances: int | None = None  # copies of the model behind its batcher (None: the placement decides)
    kind: str = "KIND_AUTO"
    version_policy: Mapping[str, Any] = field(default_factory=lambda: dict(LATEST))

    @classmethod
    def from_config(cls, config: ServeConfig, instances: int | None = None) -> ModelSettings:
        """The command line's settings (`-m` models, and repository folders without a config)."""
        return cls(max_batch_size=config.max_batch_size, max_delay_ms=config.max_delay_ms,
                   max_queue=config.max_queue, timeout_s=config.timeout_s, instances=instances)

    @classmethod
    def from_triton(cls, serving: triton_config.ServingSettings, config: ServeConfig) -> ModelSettings:
        """A config.pbtxt's settings; where it is silent (queue size, timeout), the command line's."""
        return cls(max_batch_size=serving.max_batch_size, batching=serving.dynamic_batching,
                   max_delay_ms=serving.max_queue_delay_us / 1000,
                   max_queue=serving.max_queue_size or config.max_queue,
                   timeout_s=serving.timeout_us / 1e6 if serving.timeout_us else config.timeout_s,
                   instances=serving.instance_count, kind=serving.kind,
                   version_policy=dict(serving.version_policy))

    @property
    def batch_limit(self) -> int:
        """Images per runner call: requests are gathered up to max_batch_size, or run one at a time."""
        return max(1, self.max_batch_size) if self.batching else 1


@dataclass(frozen=True)
class VersionSpec:
    """One version of one model, ready to open: `opener.open()` returns a Runner."""

    name: str
    version: str
    opener: Any  # toolkit.engines.RunnerSpec, or any picklable object with open() -> Runner
    settings: ModelSettings
    owned: bool = True  # close the runner when the model is unloaded (False: the caller owns it)


class ModelSource(Protocol):
    """The models a server may load, by name."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> list[VersionSpec]:
        """The versions to serve; raises UnknownModelError, or ModelLoadError with the reason (which the
        caller words as the load's failure)."""
        ...


# --- a Triton-layout repository ------------------------------------------------------------------------

@dataclass(frozen=True)
class RepositoryModels:
    """Every model folder of a Triton model repository; `template` says how to open a model file
    (backend, device, runner options, card flags) and `config` the settings where a config is silent."""

    root: Path
    template: Any  # toolkit.engines.RunnerSpec; `model` is replaced by each version's file
    config: ServeConfig

    def names(self) -> list[str]:
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))

    def read(self, name: str) -> list[VersionSpec]:
        folder = self.root / name
        if "/" in name or name.startswith(".") or not folder.is_dir():
            raise UnknownModelError(f"failed to load '{name}', failed to poll from model repository")
        model_config = _read_config(folder)
        settings = (ModelSettings.from_triton(triton_config.serving_settings(model_config), self.config)
                    if model_config is not None else ModelSettings.from_config(self.config))
        filename = _model_file(name, model_config or {})
        present = [int(d.name) for d in folder.iterdir()
                   if d.is_dir() and d.name.isdigit() and int(d.name) > 0 and (d / filename).is_file()]
        versions = triton_config.select_versions(settings.version_policy, present)
        if not versions:
            raise ModelLoadError(f"at least one version must be available under the version policy of model "
                                 f"'{name}' (no <version>/{filename})")
        device = {"KIND_GPU": "cuda", "KIND_CPU": "cpu"}.get(settings.kind, self.template.device)
        return [VersionSpec(name, str(v), dataclasses.replace(
            self.template, model=str(folder / str(v) / filename), device=device), settings) for v in versions]


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.pbtxt"
    if not path.exists():
        return None  # Triton auto-completes a config for ONNX models; the command line's settings apply
    try:
        parsed = triton_config.parse(path.read_text("utf-8"))
        triton_config.serving_settings(parsed)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    given = parsed.get("name")
    if given not in (None, "", folder.name):
        raise ModelLoadError(f"the config names the model {given!r}, but its folder is {folder.name!r}")
    return parsed


def _model_file(name: str, model_config: Mapping[str, Any]) -> str:
    """The model file's name in each version folder: the config's `default_model_filename`, else
    Triton's default for its platform/backend (ONNX when the config names neither)."""
    if model_config.get("default_model_filename"):
        return str(model_config["default_model_filename"])
    kind = str(model_config.get("platform") or model_config.get("backend") or "onnxruntime_onnx")
    if kind not in MODEL_FILES:
        raise ModelLoadError(f"platform/backend '{kind}' is not served here (this server runs "
                             "onnxruntime_onnx, tensorrt_plan and pytorch_libtorch models)")
    return MODEL_FILES[kind]


# --- model files named on the command line, and an opened Runner -------------------------------------

@dataclass(frozen=True)
class FileModels:
    """`-m` models: name -> opener, each served as version "1" with the same settings."""

    models: Mapping[str, Any]
    settings: ModelSettings

    def names(self) -> list[str]:
        return list(self.models)

    def read(self, name: str) -> list[VersionSpec]:
        if name not in self.models:
            raise UnknownModelError(f"failed to load '{name}', failed to poll from model repository")
        return [VersionSpec(name, "1", self.models[name], self.settings)]


@dataclass(frozen=True)
class _Opened:
    runner: Runner

    def open(self) -> Runner:
        return self.runner


@dataclass(frozen=True)
class GivenRunner:
    """One opened Runner served as model `name` (a single-process server; the caller closes it)."""

    name: str
    version: str
    runner: Runner
    settings: ModelSettings

    def names(self) -> list[str]:
        return [self.name]

    def read(self, name: str) -> list[VersionSpec]:
        if name != self.name:
            raise UnknownModelError(f"failed to load '{name}', failed to poll from model repository")
        return [VersionSpec(name, self.version, _Opened(self.runner), self.settings, owned=False)]


def as_source(models: Any, config: ServeConfig, instances: int | None = None) -> ModelSource:
    """A ModelSource from what a caller hands the server: a source, an opened Runner, or one opener
    (an object with `open()`) served under `config.name`."""
    if hasattr(models, "names") and hasattr(models, "read"):
        return models  # type: ignore[no-any-return]
    settings = ModelSettings.from_config(config, instances)
    if isinstance(models, Runner):
        return GivenRunner(config.name, config.version, models, settings)
    return FileModels({config.name: models}, settings)
