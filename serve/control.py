"""Model control with Triton's semantics: which models are loaded, and loading and unloading them.

`ModelControl` decides; a `Fleet` carries it out where the models run: `LocalFleet` in a single-process
server (and in each worker for the models it runs itself), `serve.inference.HubFleet` across worker
processes. The rules (Triton's model management, docs/user_guide/model_management.md):

- mode "none": every model of the source loads at start; load and unload are refused (503);
- mode "explicit": only `--load-model` names load at start (`*`: all); load and unload on request;
- any model that fails at start stops the server with the reason (Triton's default --exit-on-error);
  afterwards a failed load leaves the model UNAVAILABLE with the reason in the index, and the others
  keep serving; a failed reload leaves the loaded version serving;
- a (re)load reads the model's folder again and brings every version up and warm before it answers
  requests: the old version serves until then, then finishes what it accepted and is freed;
- an unload stops routing new requests to the model at once and answers when its accepted requests
  have finished and it is freed; the index then says UNAVAILABLE "unloaded";
- the server is ready when every model that should be loaded is: the start-up set, plus models loaded
  later, minus those unloaded (a first load in progress makes it not ready, as Triton's strict
  readiness does).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from toolkit.errors import ToolkitError, first_line
from toolkit.runtime.base import Runner

from .batcher import DynamicBatcher
from .errors import ModelLoadError, RepositoryControlError, ServeStartupError, UnknownModelError
from .metrics import Stats
from .models import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    IndexEntry,
    ModelDescription,
    ModelTable,
    ServedModel,
)
from .repository import ModelSource, VersionSpec

log = logging.getLogger("toolkit.serve")
MODES = ("none", "explicit")
UNLOADED = "unloaded"  # the reason an unloaded model is UNAVAILABLE (Triton's word)
Routes = dict[str, dict[str, int]]


class Fleet(Protocol):
    """Where models run: bring a version up (opened and warm, not yet routed), take one down (after its
    accepted requests finish), publish the routes and the index."""

    async def bring_up(self, spec: VersionSpec, uid: int) -> ModelDescription: ...

    async def take_down(self, uid: int) -> None: ...

    def publish(self, entries: Sequence[IndexEntry], routes: Routes) -> None: ...


@dataclass(frozen=True)
class _Loaded:
    uid: int
    spec: VersionSpec


class ModelControl:
    """The models of one server: loaded at start, then on request in mode "explicit"."""

    def __init__(self, source: ModelSource, fleet: Fleet, *, mode: str = "none", startup: Sequence[str] = (),
                 on_change: Callable[[], None] | None = None) -> None:
        if mode not in MODES:
            raise RepositoryControlError(f"unknown model control mode {mode!r}; choose none or explicit")
        self.source, self.fleet, self.mode = source, fleet, mode
        self.startup = tuple(startup)
        self.on_change = on_change
        self.loaded: dict[str, dict[str, _Loaded]] = {}
        self.status: dict[str, list[IndexEntry]] = {}
        self.started = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._uids = itertools.count(1)

    # --- the public verbs -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the start-up models (all at once); raises ServeStartupError naming every failure."""
        names = self.source.names() if self.mode == "none" or "*" in self.startup else list(self.startup)
        results = await asyncio.gather(*(self._load(name) for name in names), return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        if failures:
            raise ServeStartupError("; ".join(failures))
        self.started = True
        self._publish()

    async def load(self, name: str) -> None:
        self._check_mode("load")
        await self._load(name)

    async def unload(self, name: str) -> None:
        self._check_mode("unload")
        async with self._lock(name):
            old = self.loaded.pop(name, {})
            if not old:  # as Triton: unloading a model that is not loaded succeeds (and forgets a failure)
                if name in self.status:
                    self.status[name] = [IndexEntry(row.name, row.version, UNAVAILABLE, UNLOADED)
                                         for row in self.status[name]]
                    self._publish()
                return
            self.status[name] = [IndexEntry(name, version, UNLOADING) for version in old]
            self._publish()
            await asyncio.gather(*(self.fleet.take_down(loaded.uid) for loaded in old.values()))
            self.status[name] = [IndexEntry(name, version, UNAVAILABLE, UNLOADED) for version in old]
            self._publish()
            log.info("model %s unloaded", name)

    async def stop(self) -> None:
        """Take every model down (the server stops)."""
        loaded = [item for versions in self.loaded.values() for item in versions.values()]
        self.loaded.clear()
        self._publish()
        await asyncio.gather(*(self.fleet.take_down(item.uid) for item in loaded), return_exceptions=True)

    def readiness(self) -> tuple[bool, str | None]:
        """Ready when every model that should be loaded is: none is in its first load, and none failed its
        last load without a version serving (as Triton's strict readiness; unloading it clears that)."""
        if not self.started:
            return False, "loading models"
        for name, rows in sorted(self.status.items()):
            if name in self.loaded:
                continue
            if any(row.state == LOADING for row in rows):
                return False, f"model {name!r} is loading"
            if any(row.state == UNAVAILABLE and row.reason != UNLOADED for row in rows):
                return False, f"model {name!r} failed to load"
        return True, None

    # --- loading -----------------------------------------------------------------------------------

    async def _load(self, name: str) -> None:
        async with self._lock(name):
            old = self.loaded.get(name, {})
            try:
                specs = await asyncio.to_thread(self.source.read, name)
            except UnknownModelError:
                raise
            except ToolkitError as exc:
                self._failed(name, [""], str(exc), old)
                raise ModelLoadError(f"load failed for model '{name}': {exc}") from None
            if not old:
                self.status[name] = [IndexEntry(name, spec.version, LOADING) for spec in specs]
                self._publish()
            brought: dict[str, _Loaded] = {}
            version = ""
            try:
                for spec in specs:
                    uid, version = next(self._uids), spec.version
                    await self.fleet.bring_up(spec, uid)
                    brought[spec.version] = _Loaded(uid, spec)
            except Exception as exc:  # noqa: BLE001 - the reason goes into the index and the answer
                await asyncio.gather(*(self.fleet.take_down(b.uid) for b in brought.values()))
                reason = first_line(exc, 1000)
                self._failed(name, [spec.version for spec in specs], reason, old)
                raise ModelLoadError(f"load failed for model '{name}': version {version} is at UNAVAILABLE "
                                     f"state: {reason}") from None
            self.loaded[name] = brought
            self.status[name] = [IndexEntry(name, version, READY) for version in brought]
            self._publish()
            log.info("model %s version %s ready", name, ", ".join(brought))
            replaced = [item.uid for item in old.values()]
            await asyncio.gather(*(self.fleet.take_down(uid) for uid in replaced))

    def _failed(self, name: str, versions: Iterable[str], reason: str, old: dict[str, _Loaded]) -> None:
        """A load failed: with a version loaded before, it keeps serving; else the index says why."""
        log.error("model %s cannot be loaded: %s", name, reason)
        if not old:
            self.status[name] = [IndexEntry(name, version, UNAVAILABLE, reason) for version in versions]
        self._publish()

    # --- helpers ---------------------------------------------------------------------------------------

    def _check_mode(self, action: str) -> None:
        if self.mode != "explicit":
            raise RepositoryControlError("explicit model load / unload is not allowed if polling is enabled")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def entries(self) -> list[IndexEntry]:
        """Every model of the source, with the state of those loaded or tried (Triton's index)."""
        try:
            names = set(self.source.names())
        except OSError:
            names = set()
        rows: list[IndexEntry] = []
        for name in sorted(names | set(self.status)):
            rows.extend(self.status.get(name) or [IndexEntry(name)])
        return rows

    def routes(self) -> Routes:
        return {name: {version: item.uid for version, item in versions.items()}
                for name, versions in self.loaded.items()}

    def _publish(self) -> None:
        self.fleet.publish(self.entries(), self.routes())
        if self.on_change is not None:
            self.on_change()


# --- opening a model where it runs ---------------------------------------------------------------------

async def open_served(spec: VersionSpec, uid: int, *, copies: int = 1, warmup: bool = True,
                      opener: Any = None) -> ServedModel:
    """Open `copies` of a model version behind one DynamicBatcher and warm them up (batch 1 and the
    largest batch); raises ModelLoadError with the reason when it cannot run."""
    opener = opener or spec.opener
    runners = await asyncio.to_thread(_open_copies, opener, max(1, copies), spec)
    settings, stats = spec.settings, Stats()
    batcher = DynamicBatcher(runners[0], stats, max_batch_size=settings.batch_limit,
                             max_delay_ms=settings.max_delay_ms, max_queue=settings.max_queue,
                             timeout_s=settings.timeout_s, instances=runners)
    await batcher.start()

    async def release() -> None:
        if spec.owned:
            await asyncio.to_thread(_close_all, runners)

    try:
        if warmup:
            await warm_up(batcher, runners, settings)
    except Exception as exc:  # noqa: BLE001 - the reason the model cannot be served
        await batcher.stop()
        await release()
        raise ModelLoadError(f"warm-up failed: {first_line(exc)}") from None
    return ServedModel(uid, spec.name, spec.version, ModelDescription.of(runners[0]), settings, batcher,
                       stats, release)


def _open_copies(opener: Any, copies: int, spec: VersionSpec) -> list[Runner]:
    runners: list[Runner] = []
    try:
        for _ in range(copies):
            runners.append(opener.open())
    except Exception as exc:  # noqa: BLE001 - any reason a model cannot open is the load's answer
        if spec.owned:
            _close_all(runners)
        raise ModelLoadError(str(exc) if isinstance(exc, ToolkitError) else first_line(exc)) from None
    return runners


def _close_all(runners: list[Runner]) -> None:
    for runner in runners:
        try:
            runner.close()
        except Exception as exc:  # noqa: BLE001 - closing must go on to the next copy
            log.warning("closing %s: %s", runner.source, first_line(exc))


async def warm_up(batcher: DynamicBatcher, runners: list[Runner], settings: Any) -> None:
    """Run every copy once at batch 1 and once at the largest batch a request may bring."""
    card = runners[0].card
    largest = settings.max_batch_size or runners[0].max_batch_size or 1
    for runner in runners:
        for size in sorted({1, max(1, largest)}):
            batch = np.zeros((size, *card.input_size), dtype=np.float32)
            await asyncio.get_running_loop().run_in_executor(None, batcher.run_sync, batch, runner)


class LocalFleet:
    """Models run in this process: opened behind their own batchers, in this process's ModelTable."""

    def __init__(self, table: ModelTable, *, warmup: bool = True, drain_timeout_s: float = 30.0) -> None:
        self.table, self.warmup, self.drain_timeout_s = table, warmup, drain_timeout_s

    async def bring_up(self, spec: VersionSpec, uid: int) -> ModelDescription:
        model = await open_served(spec, uid, copies=spec.settings.instances or 1, warmup=self.warmup)
        self.table.models[uid] = model
        return model.description

    async def take_down(self, uid: int) -> None:
        model = self.table.models.get(uid)
        if model is not None:
            await model.close(self.drain_timeout_s)
            self.table.models.pop(uid, None)

    def publish(self, entries: Sequence[IndexEntry], routes: Routes) -> None:
        self.table.publish(entries, routes)

