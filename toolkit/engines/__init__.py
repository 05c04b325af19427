"""Where batch work runs: `local` (this process, evaluate.py's loop) or `ray` (Ray Data, one or many nodes).

Every engine module offers the same verbs, so the CLI picks one by name and calls it alike:

- `load_dataset(name, data_dir, split, download) -> Dataset` (the ray engine also reads fsspec URLs);
- `gather(specs, stdin_lines) -> list[PredictInput]`;
- `evaluate(spec, dataset, *, batch_size, progress, output_dir, **engine_options) -> EvalRun`;
- `predict(spec, inputs, *, top_k, batch_size, progress, output_dir, **engine_options) -> list[dict]`.

A model travels as a `RunnerSpec` (what to open, not an open Runner), because Ray opens one Runner
per replica, inside its actor. Engine modules are imported by name only when chosen: Ray is never
imported by `toolkit --help` or by the local engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..card_layers import override_card
from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ..card import ModelCard
    from ..card_layers import CardFlags
    from ..evaluate import EvalReport
    from ..runtime.base import Runner

ENGINES = ("local", "ray")
DEFAULT_ENGINE = "local"


@dataclass(frozen=True)
class RunnerSpec:
    """How to open the model (picklable): `open_model(model, backend=..., device=..., **options)`, with
    the user's card flags on top of the card it carries (`card_flags`)."""

    model: str
    backend: str = "auto"
    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)
    card_flags: CardFlags | None = None

    def open(self) -> Runner:
        from ..runtime.registry import detect_format, open_model

        if self.card_flags and detect_format(self.model) == "checkpoint":  # a layer of the card it builds
            return open_model(self.model, backend=self.backend, device=self.device, **dict(self.options),
                              card_flags=self.card_flags)
        runner = open_model(self.model, backend=self.backend, device=self.device, **dict(self.options))
        runner.card = override_card(runner.card, self.card_flags, self.model)
        return runner

    def read_card(self) -> ModelCard:
        """The card without a device: exported artifacts from their metadata, others opened on the CPU."""
        from ..runtime.registry import detect_format

        if not self.model.startswith(("http://", "https://")) and detect_format(self.model) in (
                "onnx", "torchscript", "tensorrt"):
            from ..runtime.registry import read_artifact

            return override_card(read_artifact(self.model)[0], self.card_flags, self.model)
        with replace(self, device="cpu").open() as runner:
            return runner.card

    def backend_name(self) -> str:
        """The backend `open` will use: `auto` resolved from the artifact's format, as open_model does."""
        if self.backend != "auto":
            return self.backend
        from ..runtime.registry import detect_format, readers

        return next(iter(readers(detect_format(self.model))), self.backend)


@dataclass
class EvalRun:
    """An engine's evaluation: the report over readable images, plus one entry per unreadable one."""

    report: EvalReport
    errors: list[dict[str, str]] = field(default_factory=list)  # [{"input", "error"}]


def get_engine(name: str) -> ModuleType:
    """The engine module called `name` (imported now, not before)."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return importlib.import_module(f"{__name__}.{name}")
