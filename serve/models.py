"""The models a server process holds and the table requests find them in.

- `ModelDescription`: what a loaded model is (card, backend, source), without running it: what a
  worker knows of a model the inference process runs.
- `Batcher`: the seam every request goes through, met by the local `DynamicBatcher` and by the
  worker's `RemoteBatcher` (serve.remote).
- `ServedModel`: one loaded version: its batcher, statistics and in-flight requests (an unload waits
  for them). Each load gets a fresh `uid`, so a reloaded version never mixes with the one it replaces.
- `ModelTable`: the routes (name -> version -> uid) and the repository index (state and reason of every
  model), published as a whole by whoever controls the models (serve.control), so a lookup never sees
  half a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from toolkit.card import ModelCard
from toolkit.runtime.base import Runner

from .errors import NotFoundError, ServiceUnavailableError
from .metrics import RequestTiming, Stats

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(frozen=True)
class ModelDescription:
    """A loaded model as metadata, config and statistics describe it (picklable)."""

    card: ModelCard
    source: str
    device: str
    backend: str
    precision: str
    max_batch_size: int | None = None  # the runner's own limit (it chunks larger batches)
    details: Mapping[str, object] = field(default_factory=dict)  # Runner.describe()

    @classmethod
    def of(cls, runner: Runner) -> ModelDescription:
        try:
            details = dict(runner.describe())
        except Exception:  # noqa: BLE001 - a description is optional
            details = {}
        return cls(runner.card, runner.source, runner.device, runner.backend, runner.precision,
                   runner.max_batch_size, details)


class Batcher(Protocol):
    """Where a model's requests go: `await infer(batch)` -> logits (serve.batcher, serve.remote)."""

    max_batch_size: int

    @property
    def pending(self) -> int: ...

    async def infer(self, batch: np.ndarray, timing: RequestTiming | None = None) -> np.ndarray: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class IndexEntry:
    """One row of `/v2/repository/index`: a model (and version) with its state and why."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        """As Triton answers: a model never loaded is its name alone; an empty reason is left out."""
        row = {"name": self.name, "version": self.version, "state": self.state, "reason": self.reason}
        return {key: text for key, text in row.items() if text}


@dataclass(eq=False)
class ServedModel:
    """One loaded model version in this process."""

    uid: int
    name: str
    version: str
    description: ModelDescription
    settings: Any  # serve.repository.ModelSettings
    batcher: Batcher
    stats: Stats = field(default_factory=Stats)
    release: Callable[[], Awaitable[None]] | None = None  # frees what it holds (runners), after the batcher
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def card(self) -> ModelCard:
        return self.description.card

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self, timeout_s: float) -> None:
        """Let the requests it accepted finish (at most `timeout_s`), then stop it and free its runners."""
        if self.in_flight:
            with contextlib.suppress(TimeoutError):  # past the drain time, stopping the batcher ends them
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
        await self.batcher.stop()
        if self.release is not None:
            await self.release()


class ModelTable:
    """The loaded models of this process, and which one answers each (name, version)."""

    def __init__(self) -> None:
        self.models: dict[int, ServedModel] = {}  # uid -> model, routed or not (loading, draining)
        self.routes: dict[str, dict[str, int]] = {}  # name -> version -> uid
        self.entries: list[IndexEntry] = []
        self.changed = time.monotonic()

    def publish(self, entries: Iterable[IndexEntry], routes: Mapping[str, Mapping[str, int]]) -> None:
        self.entries = sorted(entries, key=lambda e: (e.name, _version_key(e.version)))
        self.routes = {name: dict(versions) for name, versions in routes.items() if versions}
        self.changed = time.monotonic()

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The model answering `name` (its highest loaded version unless `version` is given). As Triton:
        404 for a name or version it does not know or that has no version loaded; here also 503 while a
        model's first load or its unload is in progress (a retry soon will find it, or not)."""
        versions = self.routes.get(name)
        uid = None
        if versions:
            uid = versions.get(version) if version else versions[max(versions, key=_version_key)]
        model = self.models.get(uid) if uid is not None else None
        if model is not None:
            return model
        known = [e for e in self.entries if e.name == name and (not version or e.version == version)]
        moving = [e for e in known if e.state in (LOADING, UNLOADING)]
        if moving:
            shown = name if not version else f"{name} version {version}"
            raise ServiceUnavailableError(f"model {shown!r} is not ready ({moving[0].state.lower()})")
        if known and not version:
            raise NotFoundError(f"Request for unknown model: '{name}' has no available versions")
        shown = f"'{name}'" if not version else f"'{name}' version {version}"
        raise NotFoundError(f"Request for unknown model: {shown} is not found")

    def describe_served(self) -> str:
        served = [f"{name!r} version {', '.join(sorted(versions, key=_version_key))}"
                  for name, versions in sorted(self.routes.items())]
        return "; ".join(served) if served else "no model now"

    def served(self) -> list[ServedModel]:
        """Every routed model version, by name then version."""
        return [self.models[uid] for name in sorted(self.routes)
                for _, uid in sorted(self.routes[name].items(), key=lambda item: _version_key(item[0]))
                if uid in self.models]

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return [e.to_dict() for e in self.entries if not ready_only or e.state == READY]

    def knows(self, name: str, version: str | None = None) -> bool:
        """Whether `name` (and `version`) is a model of this server, loaded or not."""
        return self.is_ready(name, version) or any(
            e.name == name and (not version or e.version == version) for e in self.entries)

    def versions(self, name: str) -> list[str]:
        """The loaded versions of `name`, lowest first."""
        return sorted(self.routes.get(name, {}), key=_version_key)

    def is_ready(self, name: str, version: str | None = None) -> bool:
        versions = self.routes.get(name, {})
        return bool(versions) and (not version or version in versions)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
