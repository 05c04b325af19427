"""Run a Runner over data: `evaluate` (labelled datasets -> EvalReport) and `predict` (any images).

`iterate_logits` is the one loop every consumer shares (eval, validate, benchmark, verification).
Data preparation runs in a background thread feeding a bounded queue, so decoding and
normalisation overlap inference (numpy, Pillow and the runtimes release the GIL); the loop times
the model calls separately, so every run reports end-to-end and model-only throughput side by side.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .card import ModelCard, generic_class_names
from .data import Dataset, expand_inputs
from .decode_pool import load_uint8, resolve_workers
from .errors import DataError, ToolkitError
from .metrics import Calibration, ConfusionMatrix, log_softmax, top_confusions
from .runtime.base import Runner

T = TypeVar("T")
Progress = Callable[[int], None]
_DONE = object()


# --- the loop --------------------------------------------------------------------------------

def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a background thread, at most `depth` ahead; errors re-raise here.

    If the consumer stops early (an exception, a break), the producer thread is told to stop and
    exits at its next step instead of filling memory.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((False, exc))

    worker = threading.Thread(target=produce, name="toolkit-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


@dataclass
class LoopTiming:
    """Filled in by `iterate_logits`. Rates are steady-state: the first batch (where runtimes compile
    kernels, allocate arenas and pick algorithms) is timed apart as warm-up, as timm's and
    Polygraphy's benchmarks do, unless it is the only batch."""

    total_images: int = 0
    total_seconds: float = 0.0  # wall, first request to last answer, warm-up included
    warmup_images: int = 0
    warmup_seconds: float = 0.0
    model_seconds: float = 0.0  # inside the runner, after warm-up

    @property
    def images(self) -> int:
        return self.total_images - self.warmup_images

    @property
    def seconds(self) -> float:
        return self.total_seconds - self.warmup_seconds

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 and self.images else 0.0

    @property
    def model_images_per_second(self) -> float:
        return self.images / self.model_seconds if self.model_seconds > 0 and self.images else 0.0


def iterate_logits(runner: Runner, dataset: Dataset, batch_size: int = 256, *,
                   timing: LoopTiming | None = None, progress: Progress | None = None,
                   prefetch_depth: int = 2, workers: int | None = None) -> Iterator[np.ndarray]:
    """Logits batch by batch, in dataset order; data for the next batches is prepared meanwhile.

    Files decode on `workers` threads (default: every core). A runner that normalises on its device
    (`accepts_uint8`: torch on a GPU) gets uint8 batches, decoded on its GPU when they are JPEGs;
    the others get float32 batches preprocessed in the prefetch thread.
    """
    timing = timing if timing is not None else LoopTiming()
    start = time.perf_counter()
    model_seconds = first_model_seconds = 0.0
    pool = {} if workers is None else {"workers": workers}  # Dataset subclasses may not take it
    if runner.accepts_uint8:
        source: Iterable[Any] = dataset.uint8_batches(runner.card, batch_size, device=runner.device, **pool)
        call: Callable[[Any], np.ndarray] = runner.run_uint8
    else:
        source, call = dataset.batches(runner.card, batch_size, **pool), runner
    for batch in prefetched(source, prefetch_depth):
        began = time.perf_counter()
        logits = call(batch)
        now = time.perf_counter()
        model_seconds += now - began
        if timing.total_images == 0:  # the first batch is the warm-up
            timing.warmup_images, timing.warmup_seconds = len(batch), now - start
            first_model_seconds, model_seconds = model_seconds, 0.0
        timing.total_images += len(batch)
        timing.total_seconds = now - start
        timing.model_seconds = model_seconds
        if progress is not None:
            progress(len(batch))
        yield logits
    if timing.total_images == timing.warmup_images:  # a single batch: report it, warm-up and all
        timing.warmup_images, timing.warmup_seconds, timing.model_seconds = 0, 0.0, first_model_seconds


def collect_logits(runner: Runner, dataset: Dataset, batch_size: int = 256,
                   workers: int | None = None) -> np.ndarray:
    """Logits (N, classes) for every item of `dataset`, preprocessed by the runner's card."""
    outputs = list(iterate_logits(runner, dataset, batch_size, workers=workers))
    if not outputs:
        return np.zeros((0, runner.card.num_classes), dtype=np.float32)
    return np.concatenate(outputs)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably in float64 (probabilities that sum to 1)."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


# --- evaluate --------------------------------------------------------------------------------

def align_dataset(dataset: Dataset, card: ModelCard) -> Dataset:
    """Labels in the model's class order. A model with only generic names (class_0..) takes them by index."""
    if dataset.labels is None:
        raise DataError(f"{dataset.name}: no labels, so it cannot be evaluated (use `toolkit predict`)")
    try:
        return dataset.aligned_to(card.class_names)
    except DataError:
        generic = card.class_names == generic_class_names(card.num_classes)
        if generic and len(dataset.class_names) == card.num_classes:
            return replace(dataset, class_names=card.class_names)
        raise


@dataclass
class EvalReport:
    """Metrics plus what produced them; `to_dict` is the `eval --json` / metrics.json document."""

    metrics: ConfusionMatrix
    class_names: tuple[str, ...]
    model: str
    backend: str
    device: str
    precision: str
    dataset: str
    batch_size: int
    timing: LoopTiming
    ids: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    confidences: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    true_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    calibration: Calibration = field(default_factory=Calibration)
    data: Dataset | None = field(default=None, repr=False)  # the aligned inputs, for the error gallery

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def sampling(self) -> str | None:
        """How the images were drawn from the dataset (`--limit`), or None when all were used."""
        return self.data.sampling if self.data is not None else None

    @property
    def images_per_second(self) -> float:
        return self.timing.images_per_second

    @property
    def model_images_per_second(self) -> float:
        return self.timing.model_images_per_second

    def to_dict(self) -> dict[str, Any]:
        data = self.metrics.to_dict(self.class_names)
        model_ips = self.model_images_per_second
        data.update({
            "images_per_second": self.images_per_second,
            "model_images_per_second": model_ips,
            "pipeline_efficiency": self.images_per_second / model_ips if model_ips else None,
            "seconds": self.timing.total_seconds,
            "warmup_seconds": self.timing.warmup_seconds,
            "model_seconds": self.timing.model_seconds,
            "backend": self.backend,
            "model": self.model,
            "device": self.device,
            "precision": self.precision,
            "dataset": self.dataset,
            "sampling": self.sampling,
            "batch_size": self.batch_size,
            "calibration": self.calibration.to_dict(),
            "errors": {"misclassified": int(self.metrics.num_samples - np.trace(self.metrics.matrix)),
                       "top_confusions": top_confusions(self.metrics.matrix, self.class_names)},
        })
        return data

    def misclassified(self) -> np.ndarray:
        """Indices of the wrong predictions, most confident first (the error gallery's order)."""
        wrong = np.flatnonzero(self.predictions != self.labels)
        return wrong[np.argsort(-self.confidences[wrong], kind="stable")]

    def prediction_rows(self) -> Iterator[tuple[int, str, str, str, float]]:
        """(index, input, label, predicted, confidence) per sample, for predictions.csv."""
        names = self.class_names
        for i, (label, pred, conf) in enumerate(zip(self.labels, self.predictions, self.confidences)):
            yield i, self.ids[i], names[int(label)], names[int(pred)], float(conf)


def evaluate(runner: Runner, dataset: Dataset, batch_size: int = 256,
             progress: Progress | None = None, workers: int | None = None) -> EvalReport:
    """Accuracy, top-5, per-class precision/recall/F1 and speed of `runner` on a labelled dataset.

    `progress`, if given, is called with the number of images each batch finished; drawing a bar is
    the caller's business (the CLI's), so the library never imports the renderer.
    """
    data = align_dataset(dataset, runner.card)
    assert data.labels is not None
    metrics = ConfusionMatrix(runner.card.num_classes)
    predictions = np.empty(len(data), dtype=np.int64)
    confidences = np.empty(len(data), dtype=np.float32)
    true_probabilities = np.empty(len(data), dtype=np.float32)
    calibration = Calibration()
    timing = LoopTiming()

    done = 0
    for logits in iterate_logits(runner, data, batch_size, timing=timing, progress=progress, workers=workers):
        n = len(logits)
        labels = data.labels[done:done + n]
        metrics.add_scores(labels, logits)
        predictions[done:done + n] = logits.argmax(1)
        log_probs = log_softmax(logits)  # once per batch: confidences, true-class probability, calibration
        probabilities = np.exp(log_probs)
        confidences[done:done + n] = probabilities.max(1)
        true_probabilities[done:done + n] = probabilities[np.arange(n), labels]
        calibration.add_log_probs(labels, log_probs)
        done += n
    describe = runner.describe()
    return EvalReport(
        metrics=metrics, class_names=runner.card.class_names, model=str(runner.source),
        backend=runner.backend, device=str(describe.get("device", runner.device)),
        precision=str(describe.get("precision", "fp32")), dataset=data.name, batch_size=batch_size,
        timing=timing, ids=data.ids(), labels=data.labels,
        predictions=predictions, confidences=confidences, true_probabilities=true_probabilities,
        calibration=calibration, data=data,
    )


def precision_agreement(reference: Runner, report: EvalReport, *, limit: int = 512,
                        batch_size: int = 256) -> dict[str, Any]:
    """A reduced-precision eval judged against `reference` (its fp32 runner) on `limit` of its images
    (drawn as `--limit` draws them): top-1 agreement and both accuracies."""
    if report.data is None:
        raise DataError("the report keeps no inputs to compare on")
    chosen = report.data.subset_indices(limit)
    ref = collect_logits(reference, report.data.take(chosen), batch_size)
    n = len(ref)
    predicted = report.predictions[chosen]
    labels = report.labels[chosen]
    return {"reference_precision": reference.precision, "precision": report.precision, "num_samples": n,
            "top1_agreement": float((ref.argmax(1) == predicted).mean()) if n else 1.0,
            "reference_accuracy": top1_accuracy(ref, labels), "accuracy": float((predicted == labels).mean())
            if n else 0.0}


# --- predict -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictInput:
    """One named input: a path to read, or an error found while gathering inputs."""

    name: str
    path: Path | None = None
    error: str | None = None


def gather_inputs(specs: Sequence[str], stdin_lines: Iterable[str] | None = None) -> list[PredictInput]:
    """Files, folders (recursive), globs and `-` (paths on stdin) -> inputs; a missing one is named."""
    items: list[PredictInput] = []
    for spec in specs:
        if spec == "-":
            lines = [line.strip() for line in (stdin_lines or [])]
            items += gather_inputs([line for line in lines if line and line != "-"])
            continue
        try:
            items += [PredictInput(str(p), p) for p in expand_inputs([spec])]
        except DataError as exc:
            items.append(PredictInput(spec, None, str(exc)))
    return items


def _load(item: PredictInput, card: ModelCard) -> np.ndarray | str:
    """uint8 HxWx3 at the card's size, or the error message for this input."""
    if item.error is not None or item.path is None:
        return item.error or f"{item.name}: nothing to read"
    try:
        return load_uint8(item.path, card, name=item.name)
    except ToolkitError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:  # a file that vanished or a mode Pillow cannot convert
        return f"{item.name}: cannot read image ({exc})"


def top_k_entries(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """[{"class", "index", "probability"}] for the k most probable classes, highest first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": class_names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


def predict(runner: Runner, inputs: Sequence[str | Path | PredictInput], top_k: int = 5, batch_size: int = 32,
            workers: int | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """One answer per input, in order: {"input", "top": [...]} or {"input", "error"}.

    Images decode on `workers` threads (default: every core), one chunk ahead of inference; a bad
    input becomes an error entry and never stops the others.
    """
    items = [i if isinstance(i, PredictInput) else PredictInput(str(i), Path(i)) for i in inputs]
    card = runner.card
    k = max(1, min(int(top_k), card.num_classes))
    results: list[dict[str, Any]] = []
    batch_size = max(1, batch_size)
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=resolve_workers(workers)) as pool:
        def submit(chunk: list[PredictInput]) -> list[Future[np.ndarray | str]]:
            return [pool.submit(_load, item, card) for item in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [j for j, value in enumerate(loaded) if not isinstance(value, str)]
            answers: dict[int, dict[str, Any]] = {}
            if good:
                probabilities = softmax(runner.run_uint8(np.stack([loaded[j] for j in good])))
                for row, j in enumerate(good):
                    top = top_k_entries(probabilities[row], card.class_names, k)
                    answers[j] = {"input": chunk[j].name, "top": top}
            for j, item in enumerate(chunk):
                results.append(answers.get(j) or {"input": item.name, "error": loaded[j]})
            if progress is not None:
                progress(len(chunk))
    return results
