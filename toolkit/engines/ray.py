"""The ray engine: eval and predict on Ray Data, on this machine or any Ray cluster, resumable.

The pipeline is Ray Data's standard one for offline batch inference, no scheduler of our own:

    row blocks (index, where to read) -> map_batches(decode: CPU tasks) -> map_batches(replicas: actor pool)

Decode tasks read each file (local path or fsspec URL) with the local engine's `decode_image` and
`to_uint8`; each replica (an actor holding one Runner from `open_model`, one GPU each with --device
cuda) normalises with the same `preprocess` (through `run_uint8`, as the local loops do) and runs the
model, so both engines feed the model identical batches; uint8 also travels 4x lighter than float32.
Ray Data restarts a replica that dies and retries its batch (its actor pools default to
max_restarts=-1, max_task_retries=-1). The driver turns logits into rows with
the local engine's own functions, writes a shard as soon as its rows are in (see shards.py), and
merges the shards' confusion matrices: the numbers are the local engine's, whatever the split.
A file that cannot be read becomes an error row, never a failed job.

Ray is imported only inside these functions: `toolkit --help` and the local engine never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..card import ModelCard
from ..data import Dataset
from ..errors import BackendUnavailableError, ToolkitError, UsageError, first_line
from ..evaluate import EvalReport, LoopTiming, PredictInput, align_dataset, softmax, top_k_entries
from ..images import decode_image
from ..metrics import Calibration, ConfusionMatrix
from ..preprocess import preprocess, to_uint8
from . import EvalRun, RunnerSpec, sources
from .shards import (
    DEFAULT_SHARD_SIZE,
    EVAL_COLUMNS,
    PREDICT_COLUMNS,
    Columns,
    ShardStore,
    calibration_from_summary,
    calibration_summary,
    cm_from_summary,
    cm_summary,
    eval_job,
    predict_columns,
    predict_job,
    predict_results,
)

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'resnet-toolkit[ray]'"
CPUS_PER_REPLICA = 4  # default replicas on CPU nodes: one per this many cores (each replica uses several)
# Half a CPU per decode task: two decode tasks per free core, like the local engine's two decode threads
# beside its runtime. It also differs from a replica's reservation, so Ray keeps decoding in tasks of
# its own instead of fusing it into the replicas (where it would wait on the model).
DECODE_CPUS = 0.5
load_dataset = sources.load_dataset
gather = sources.gather


# --- the cluster ---------------------------------------------------------------------------------------

def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def cluster(address: str | None = None) -> Iterator[Any]:
    """Ray, connected: to `address` (auto, ray://host:port), else a local cluster started for this run.

    A Ray already initialised in this process (a notebook, a test) is used as it is and left running.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    _check_reachable(address)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # never let Ray re-launch workers via uv
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, grpc errors...
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise BackendUnavailableError(f"cannot start or reach {where}: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, on a host:port nothing listens at (Ray itself retries for minutes)."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BackendUnavailableError(f"cannot reach the Ray cluster at {address}: "
                                      f"{exc.strerror or type(exc).__name__}") from None


def _quiet_ray_data(ray: Any) -> None:
    """No Ray Data progress bars or plan chatter on stderr: the CLI draws the one progress bar."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def default_replicas(ray: Any, device: str) -> int:
    """One replica per GPU with --device cuda; on CPUs, one per CPUS_PER_REPLICA cores (at least one)."""
    resources = ray.cluster_resources()
    if device.startswith("cuda"):
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise BackendUnavailableError("--device cuda: the Ray cluster has no GPUs; use --device cpu")
        return gpus
    return max(1, int(resources.get("CPU", 1)) // CPUS_PER_REPLICA)


def _toolkit_cause(exc: BaseException) -> ToolkitError | None:
    """The ToolkitError a Ray task or actor raised, unwrapped from Ray's exception chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ToolkitError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return None


# --- the model ----------------------------------------------------------------------------------------

def model_card(spec: RunnerSpec) -> ModelCard:
    """The card, read in the driver without a device."""
    return spec.read_card()


class Replica:
    """One model replica (a Ray actor): a Runner opened once, called on decoded uint8 batches.

    `run_uint8` is the loops' entry for uint8 images: `preprocess` on the host, or the runner's own
    device-side normalisation (torch on a GPU), exactly as the local engine feeds the same runner.
    """

    def __init__(self, spec: RunnerSpec) -> None:
        self.runner = spec.open()
        self.card = self.runner.card

    def infer(self, images: np.ndarray) -> np.ndarray:
        run_uint8 = getattr(self.runner, "run_uint8", None)
        return run_uint8(images) if run_uint8 is not None else self.runner(preprocess(images, self.card))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.asarray(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        logits = np.full((len(errors), self.card.num_classes), np.nan, dtype=np.float32)
        began = time.perf_counter()
        if ok.any():
            logits[ok] = self.infer(np.ascontiguousarray(batch["images"][ok]))
        seconds = time.perf_counter() - began
        return {"index": batch["index"], "logits": logits, "error": errors,
                "model_seconds": np.full(len(errors), seconds / max(1, len(errors)))}


def decode_batch(batch: dict[str, np.ndarray], *, card: ModelCard,
                 images: Any = None) -> dict[str, np.ndarray]:
    """A Ray task: rows -> uint8 NHWC `images` at the card's size (decode_image, to_uint8); a row that
    cannot be read gets its message in `error` instead."""
    index = np.asarray(batch["index"], dtype=np.int64)
    errors = [str(e or "") for e in batch["error"]] if "error" in batch else [""] * len(index)
    if images is not None:  # in-memory uint8 arrays (CIFAR): one shared read-only copy in the object store
        import ray

        raw = ray.get(images)[index]
    else:
        raw = np.zeros((len(index), card.height, card.width, 3), dtype=np.uint8)
        payloads = batch.get("data")
        for row, where in enumerate(batch["location"]):
            if errors[row]:
                continue
            errors[row], image = _read_image(str(where), None if payloads is None else payloads[row], card)
            if image is not None:
                raw[row] = image
    return {"index": index, "images": raw, "error": np.asarray(errors, dtype=object)}


def _read_image(where: str, payload: bytes | None, card: ModelCard) -> tuple[str, np.ndarray | None]:
    """("", uint8 HxWx3) or (error message, None): the local engine's decoding, per row."""
    draft = (card.resize_size, card.resize_size)
    try:
        if payload is None and sources.as_url(where) is not None:
            payload = sources.read_url(where)
        source: bytes | Path = payload if payload is not None else Path(where)
        return "", to_uint8(decode_image(source, draft_size=draft, name=where), card)
    except ToolkitError as exc:
        return str(exc), None
    except (OSError, ValueError) as exc:  # a file that vanished, a URL that failed, an unconvertible mode
        return f"{where}: cannot read image ({exc})", None


# --- the pipeline -------------------------------------------------------------------------------------

def _row_tables(store: ShardStore, locations: Sequence[str] | None, errors: Sequence[str] | None,
                block_rows: int) -> list[Any]:
    """Arrow tables (Ray's input blocks) of at most `block_rows` rows over the pending shards: the row
    index, and where to read each row. Small blocks keep every stage busy and the progress bar live."""
    import pyarrow as pa

    tables = []
    spans = [(lo, min(lo + block_rows, stop)) for start, stop in map(store.bounds, store.pending())
             for lo in range(start, stop, block_rows)]
    for start, stop in spans:
        columns: dict[str, Any] = {"index": pa.array(np.arange(start, stop, dtype=np.int64))}
        if locations is not None:
            where = list(locations[start:stop])
            columns["location"] = pa.array(where, type=pa.string())
            given = list(errors[start:stop]) if errors else [""] * len(where)
            columns["error"] = pa.array(given, type=pa.string())
            if any(sources.as_url(w) and sources.is_process_local(w) for w in where):
                columns["data"] = pa.array([_read_here(w) for w in where], type=pa.binary())
        tables.append(pa.table(columns))
    return tables


def _read_here(where: str) -> bytes | None:
    """Bytes of a URL only this process can see (memory://); None lets the task name the failure."""
    if not (sources.as_url(where) and sources.is_process_local(where)):
        return None
    try:
        return sources.read_url(where)
    except (OSError, ValueError):
        return None


def _stream(ray: Any, spec: RunnerSpec, card: ModelCard, tables: list[Any], *, images: np.ndarray | None,
            batch_size: int, replicas: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of {index, logits, error, model_seconds}, in completion order."""
    if not tables:
        return
    _quiet_ray_data(ray)
    count = replicas or default_replicas(ray, spec.device)
    gpu = spec.device.startswith("cuda")
    # A CPU replica reserves one core, less when many share a small cluster: decode tasks must fit too.
    replica_cpus = 1.0 if gpu else min(1.0, float(ray.cluster_resources().get("CPU", 1)) / (count + 1))
    images_ref = ray.put(np.ascontiguousarray(images)) if images is not None else None
    data = ray.data.from_arrow(tables)
    decode = functools.partial(decode_batch, card=card, images=images_ref)
    data = data.map_batches(decode, batch_size=batch_size, batch_format="numpy", num_cpus=DECODE_CPUS)
    data = data.map_batches(Replica, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=count),
                            num_cpus=replica_cpus, num_gpus=1 if gpu else 0)
    try:
        yield from data.iter_batches(batch_size=None, batch_format="numpy")
    except ToolkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - RayTaskError, RayActorError...: one line, not a Ray traceback
        cause = _toolkit_cause(exc)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise ToolkitError(f"the Ray job failed: {first_line(exc)}") from None


def _by_shard(store: ShardStore, blocks: Iterable[dict[str, np.ndarray]],
              progress: Callable[[int], None] | None,
              finish: Callable[[int, dict[str, np.ndarray]], None]) -> tuple[int, float]:
    """Gather blocks into shards; call `finish(shard, rows in input order)` as each completes."""
    parts: dict[int, list[dict[str, np.ndarray]]] = {}
    have: dict[int, int] = {}
    images, model_seconds = 0, 0.0
    for block in blocks:
        index = np.asarray(block["index"], dtype=np.int64)
        shards = store.shard_of(index)
        for shard in np.unique(shards):
            mask = shards == shard
            parts.setdefault(int(shard), []).append({k: np.asarray(v)[mask] for k, v in block.items()})
            have[int(shard)] = have.get(int(shard), 0) + int(mask.sum())
            start, stop = store.bounds(int(shard))
            if have[int(shard)] == stop - start:
                pieces = parts.pop(int(shard))
                rows = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
                order = np.argsort(rows["index"], kind="stable")
                finish(int(shard), {k: v[order] for k, v in rows.items()})
        images += len(index)
        model_seconds += float(np.sum(block["model_seconds"]))
        if progress is not None:
            progress(len(index))
    if parts:
        raise ToolkitError(f"the Ray job left shards {sorted(parts)} incomplete; run again to finish them")
    return images, model_seconds


def _check_common(batch_size: int, replicas: int | None) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if replicas is not None and replicas < 1:
        raise UsageError(f"--replicas must be positive, got {replicas}")


def _open_store(output_dir: Path | None, job: Any, rows: int, columns: Any, shard_size: int | None,
                shard_format: str, progress: Callable[[int], None] | None) -> ShardStore:
    """The run's shard store; a resumed run's progress starts at the rows its finished shards hold."""
    store = ShardStore(output_dir, job, rows, columns, shard_size or DEFAULT_SHARD_SIZE, shard_format)
    if progress is not None and store.done():
        progress(store.rows_done())
    return store


# --- evaluate -----------------------------------------------------------------------------------------

def evaluate(spec: RunnerSpec, dataset: Dataset, *, batch_size: int = 256,
             progress: Callable[[int], None] | None = None, output_dir: Path | None = None,
             address: str | None = None, replicas: int | None = None, shard_size: int | None = None,
             shard_format: str = "parquet") -> EvalRun:
    """Accuracy, per-class metrics and predictions, as the local engine's, computed on Ray Data.

    With `output_dir`, predictions are written as shards under `output_dir/predictions/` and a rerun
    skips the shards already there. Unreadable images are error rows, left out of the metrics.
    """
    _check_common(batch_size, replicas)
    card = model_card(spec)
    data = align_dataset(dataset, card)
    assert data.labels is not None
    names, ids, all_labels = card.class_names, data.ids(), data.labels
    store = _open_store(output_dir, eval_job(spec, data, names), len(data), EVAL_COLUMNS, shard_size,
                        shard_format, progress)

    def finish(shard: int, rows: dict[str, np.ndarray]) -> None:
        """evaluate.evaluate's per-batch arithmetic, on one shard's readable rows."""
        index, logits, errors = rows["index"], rows["logits"], rows["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        labels, good = all_labels[index], logits[ok]
        metrics = ConfusionMatrix(card.num_classes).add_scores(labels[ok], good)
        calibration = Calibration().add_logits(labels[ok], good)
        predicted = np.zeros(len(index), dtype=np.int64)
        confidence = np.full(len(index), np.nan, dtype=np.float32)
        true_probability = np.full(len(index), np.nan, dtype=np.float32)
        if ok.any():
            probabilities = softmax(good)
            predicted[ok] = good.argmax(1)
            confidence[ok] = probabilities.max(1)
            true_probability[ok] = probabilities[np.arange(len(good)), labels[ok]]
        columns: Columns = {
            "index": index.tolist(), "input": [ids[i] for i in index], "label": [names[i] for i in labels],
            "predicted": [names[p] if fine else "" for p, fine in zip(predicted, ok)],
            "confidence": confidence.astype(np.float64).tolist(),
            "true_probability": true_probability.astype(np.float64).tolist(),
            "error": [str(e) for e in errors],
        }
        store.write(shard, columns, {"errors": int((~ok).sum()), "metrics": cm_summary(metrics),
                                     "calibration": calibration_summary(calibration)})

    if not store.pending():  # a rerun of a finished job: the report from its shards, no Ray needed
        return _eval_run(store, spec, card, data, batch_size, LoopTiming())
    with cluster(address) as ray:
        started = time.perf_counter()  # the pipeline's time: a cluster's start-up is not the model's speed
        where = None if data.images is not None else [str(p) for p in data.paths]
        tables = _row_tables(store, where, None, batch_size)
        blocks = _stream(ray, spec, card, tables, images=data.images, batch_size=batch_size,
                         replicas=replicas)
        done, model_seconds = _by_shard(store, blocks, progress, finish)
        replica_count = replicas or (default_replicas(ray, spec.device) if tables else 1)
    store.finish()
    timing = LoopTiming(total_images=done, total_seconds=time.perf_counter() - started,
                        model_seconds=model_seconds / max(1, replica_count))
    return _eval_run(store, spec, card, data, batch_size, timing)


def _eval_run(store: ShardStore, spec: RunnerSpec, card: ModelCard, data: Dataset, batch_size: int,
              timing: LoopTiming) -> EvalRun:
    """The EvalReport from every finished shard (this run's and earlier ones'), their sums merged."""
    metrics, calibration = ConfusionMatrix(card.num_classes), Calibration()
    for summary in store.summaries():
        metrics = metrics.merge(cm_from_summary(summary["metrics"], card.num_classes))
        calibration = calibration.merge(calibration_from_summary(summary["calibration"]))
    rows = store.read()
    keep = np.array([not e for e in rows["error"]], dtype=bool)
    kept = np.asarray(rows["index"], dtype=np.int64)[keep]
    position = {name: i for i, name in enumerate(card.class_names)}

    def column(name: str, dtype: Any, convert: Callable[[Any], Any] = lambda v: v) -> np.ndarray:
        return np.array([convert(v) for v, fine in zip(rows[name], keep) if fine], dtype=dtype)

    assert data.labels is not None
    local_files = data.images is None and not any(sources.as_url(p) for p in data.paths)
    shown = Dataset(data.name, data.class_names, data.labels[kept],
                    None if data.images is None else data.images[kept],
                    [data.paths[i] for i in kept] if data.images is None else [])
    report = EvalReport(
        metrics=metrics, class_names=card.class_names, model=spec.model, backend=spec.backend_name(),
        device=spec.device, precision=str(spec.options.get("precision", "fp32")), dataset=data.name,
        batch_size=batch_size, timing=timing, ids=[n for n, fine in zip(rows["input"], keep) if fine],
        labels=column("label", np.int64, position.__getitem__),
        predictions=column("predicted", np.int64, position.__getitem__),
        confidences=column("confidence", np.float32),
        true_probabilities=column("true_probability", np.float32),
        calibration=calibration, data=shown if data.images is not None or local_files else None,
    )
    errors = [{"input": n, "error": e} for n, e in zip(rows["input"], rows["error"]) if e]
    return EvalRun(report, errors)


# --- predict ------------------------------------------------------------------------------------------

def predict(spec: RunnerSpec, inputs: Sequence[PredictInput], *, top_k: int = 5, batch_size: int = 32,
            progress: Callable[[int], None] | None = None, output_dir: Path | None = None,
            address: str | None = None, replicas: int | None = None, shard_size: int | None = None,
            shard_format: str = "parquet") -> list[dict[str, Any]]:
    """One answer per input, in order, as the local engine's predict; resumable with `output_dir`."""
    _check_common(batch_size, replicas)
    card = model_card(spec)
    k = max(1, min(int(top_k), card.num_classes))
    items = list(inputs)
    store = _open_store(output_dir, predict_job(spec, items, k), len(items), PREDICT_COLUMNS, shard_size,
                        shard_format, progress)

    def finish(shard: int, rows: dict[str, np.ndarray]) -> None:
        index, logits, errors = rows["index"], rows["logits"], rows["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        probabilities = softmax(logits[ok]) if ok.any() else np.zeros((0, card.num_classes))
        good = iter(probabilities)
        answers = [{"input": items[i].name, "top": top_k_entries(next(good), card.class_names, k)} if fine
                   else {"input": items[i].name, "error": str(e)} for i, fine, e in zip(index, ok, errors)]
        store.write(shard, predict_columns(answers, int(index[0])), {"errors": int((~ok).sum())})

    locations = [sources.location(item) for item in items]
    errors = [item.error or "" for item in items]
    if not store.pending():  # a rerun of a finished job: answered from its shards, no Ray needed
        return predict_results(store.read())
    with cluster(address) as ray:
        tables = _row_tables(store, locations, errors, batch_size)
        blocks = _stream(ray, spec, card, tables, images=None, batch_size=batch_size, replicas=replicas)
        _by_shard(store, blocks, progress, finish)
    store.finish()
    return predict_results(store.read())
