"""Prediction shards: `<output-dir>/predictions/part-00000.parquet` (or .csv), shard summaries, a manifest.

Rows are cut into fixed shards by input position, so shard k always holds the same rows. A shard is
done when its part file exists: the file is renamed into place (atomically) only after its summary
`part-00000.json` (row and error counts, the shard's confusion matrix) is on disk. A run killed
half-way and started again with the same output folder recomputes exactly the shards without a part
file: no row lost, none written twice. `manifest.json` names the job (model, data, options digest);
a folder holding another job's shards is refused rather than mixed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from ..fileio import atomic_path, atomic_write_text
from ..metrics import Calibration, ConfusionMatrix

SHARD_DIR = "predictions"
MANIFEST = "manifest.json"
FORMATS = ("parquet", "csv")
DEFAULT_SHARD_SIZE = 1000

# column -> kind; list kinds are native lists in parquet and JSON text in CSV.
EVAL_COLUMNS = {"index": "int", "input": "str", "label": "str", "predicted": "str", "confidence": "float",
                "true_probability": "float", "error": "str"}
PREDICT_COLUMNS = {"index": "int", "input": "str", "classes": "strs", "indices": "ints",
                   "probabilities": "floats", "error": "str"}
_SCALARS = {"int": int, "float": float, "str": str}

Columns = dict[str, list[Any]]


# --- what a job is -----------------------------------------------------------------------------------

def _digest(values: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(str(value).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:16]


def _model_stamp(model: str) -> str:
    """Size and mtime of a local model file (or folder), so a re-exported model is not resumed over."""
    path = Path(model)
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return _digest(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    except OSError:
        return "?"


def _runner(spec: Any) -> dict[str, Any]:
    """The model half of a job: which file (and its stamp), backend, device and runner options."""
    return {"model": spec.model, "model_stamp": _model_stamp(spec.model), "backend": spec.backend,
            "device": spec.device, "options": _digest(sorted(f"{k}={v}" for k, v in spec.options.items()))}


def eval_job(spec: Any, dataset: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """What makes two eval runs the same job: the runner, the rows (ids, labels, pixels) and classes."""
    job = {"kind": "eval", **_runner(spec), "dataset": dataset.name, "rows": len(dataset),
           "ids": _digest(dataset.ids()), "labels": _digest(np.asarray(dataset.labels).tolist()),
           "classes": _digest(class_names)}
    if dataset.images is not None:
        job["pixels"] = hashlib.sha256(np.ascontiguousarray(dataset.images).data).hexdigest()[:16]
    return job


def predict_job(spec: Any, inputs: Sequence[Any], top_k: int) -> dict[str, Any]:
    return {"kind": "predict", **_runner(spec), "rows": len(inputs), "ids": _digest(i.name for i in inputs),
            "top_k": int(top_k)}


# --- confusion matrices as small JSON -----------------------------------------------------------------

def cm_summary(cm: ConfusionMatrix) -> dict[str, Any]:
    """Sparse counts [[true, predicted, n], ...] plus top-k hits: a shard's share of the metrics."""
    nonzero = np.argwhere(cm.matrix)
    return {"matrix": [[int(t), int(p), int(cm.matrix[t, p])] for t, p in nonzero],
            "topk": {str(k): int(v) for k, v in cm.topk_counts.items()}, "topk_samples": int(cm.topk_samples)}


def cm_from_summary(summary: Mapping[str, Any], num_classes: int) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes)
    for true, predicted, count in summary["matrix"]:
        cm.matrix[true, predicted] += count
    cm.topk_counts = {k: int(summary["topk"].get(str(k), 0)) for k in cm.top_k}
    cm.topk_samples = int(summary["topk_samples"])
    return cm


def calibration_summary(calibration: Calibration) -> dict[str, Any]:
    """A shard's calibration sums (bins, NLL, Brier): merged like the confusion matrices."""
    return {"n_bins": calibration.n_bins, "counts": calibration.counts.tolist(),
            "correct": calibration.correct.tolist(), "confidence_sums": calibration.confidence_sums.tolist(),
            "nll_sum": calibration.nll_sum, "brier_sum": calibration.brier_sum}


def calibration_from_summary(summary: Mapping[str, Any]) -> Calibration:
    calibration = Calibration(int(summary["n_bins"]))
    calibration.counts = np.asarray(summary["counts"], dtype=np.int64)
    calibration.correct = np.asarray(summary["correct"], dtype=np.int64)
    calibration.confidence_sums = np.asarray(summary["confidence_sums"], dtype=np.float64)
    calibration.nll_sum, calibration.brier_sum = float(summary["nll_sum"]), float(summary["brier_sum"])
    return calibration


# --- the store ---------------------------------------------------------------------------------------

class ShardStore:
    """Fixed-size shards of one job's rows, on disk under `<output_dir>/predictions/` or in memory."""

    def __init__(self, output_dir: Path | None, job: Mapping[str, Any], num_rows: int,
                 columns: Mapping[str, str], shard_size: int = DEFAULT_SHARD_SIZE,
                 fmt: str = "parquet") -> None:
        if shard_size < 1:
            raise UsageError(f"--shard-size must be positive, got {shard_size}")
        if fmt not in FORMATS:
            raise UsageError(f"unknown shard format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.num_rows, self.shard_size, self.fmt, self.columns = num_rows, shard_size, fmt, dict(columns)
        self.folder = None if output_dir is None else Path(output_dir) / SHARD_DIR
        self._memory: dict[int, tuple[Columns, dict[str, Any]]] = {}
        self.manifest = {"version": 1, "job": dict(job), "rows": num_rows, "shard_size": shard_size,
                         "format": fmt, "shards": self.num_shards, "columns": self.columns, "complete": False}
        if self.folder is not None:
            self._open_folder()

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.num_rows, (shard + 1) * self.shard_size)

    def shard_of(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(index) // self.shard_size

    def part(self, shard: int) -> Path:
        assert self.folder is not None
        return self.folder / f"part-{shard:05d}.{self.fmt}"

    def _open_folder(self) -> None:
        assert self.folder is not None
        path = self.folder / MANIFEST
        if path.is_file():
            try:
                found = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: unreadable manifest ({exc}); delete {self.folder} to start over"
                                ) from None
            keys = ("job", "rows", "shard_size", "format", "columns")
            if not isinstance(found, dict) or any(found.get(k) != self.manifest[k] for k in keys):
                raise UsageError(f"{self.folder} holds predictions of a different run (model, data or "
                                 f"options changed); use another --output-dir, or delete {self.folder} "
                                 "to start over")
        elif self.folder.is_dir() and any(self.folder.glob("part-*")):
            raise UsageError(f"{self.folder} holds part files but no {MANIFEST}; use another --output-dir, "
                             f"or delete {self.folder}")
        for pattern in (".part-*", f".{MANIFEST}.*"):  # temporaries of a killed writer
            for leftover in self.folder.glob(pattern) if self.folder.is_dir() else ():
                leftover.unlink(missing_ok=True)
        self._write_manifest()

    def _write_manifest(self) -> None:
        assert self.folder is not None
        atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    # --- progress of the job ---------------------------------------------------------------------

    def done(self) -> list[int]:
        """Shards already written (by this run or an earlier, interrupted one)."""
        if self.folder is None:
            return sorted(self._memory)
        return [s for s in range(self.num_shards)
                if self.part(s).is_file() and self.part(s).with_suffix(".json").is_file()]

    def rows_done(self) -> int:
        """Rows in finished shards: where a resumed run's progress starts."""
        return sum(stop - start for start, stop in map(self.bounds, self.done()))

    def pending(self) -> list[int]:
        finished = set(self.done())
        return [s for s in range(self.num_shards) if s not in finished]

    def write(self, shard: int, columns: Columns, summary: Mapping[str, Any]) -> None:
        """Store one finished shard: its summary first, then the part file (the completion mark)."""
        start, stop = self.bounds(shard)
        if len(columns["index"]) != stop - start:
            raise ValueError(f"shard {shard}: {len(columns['index'])} rows, expected {stop - start}")
        summary = {"rows": stop - start, **summary}
        if self.folder is None:
            self._memory[shard] = (columns, summary)
            return
        part = self.part(shard)
        atomic_write_text(part.with_suffix(".json"), json.dumps(summary) + "\n")
        with atomic_path(part) as tmp:
            if self.fmt == "parquet":
                _write_parquet(tmp, columns, self.columns)
            else:
                tmp.write_text(_csv_text(columns, self.columns), "utf-8")

    def finish(self) -> None:
        if self.folder is not None and not self.pending():
            self.manifest["complete"] = True
            self._write_manifest()

    def summaries(self) -> list[dict[str, Any]]:
        if self.folder is None:
            return [self._memory[s][1] for s in sorted(self._memory)]
        return [json.loads(self.part(s).with_suffix(".json").read_text("utf-8")) for s in self.done()]

    def read(self) -> Columns:
        """Every finished row, in input order."""
        out: Columns = {name: [] for name in self.columns}
        for shard in self.done():
            if self.folder is None:
                columns = self._memory[shard][0]
            elif self.fmt == "parquet":
                columns = _read_parquet(self.part(shard))
            else:
                columns = _read_csv(self.part(shard), self.columns)
            for name in out:
                out[name] += list(columns[name])
        return out


# --- file formats ------------------------------------------------------------------------------------

def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    scalar = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    plural = {"ints": "int", "floats": "float", "strs": "str"}
    return scalar[kind] if kind in scalar else pa.list_(scalar[plural[kind]])


def _write_parquet(path: Path, columns: Columns, kinds: Mapping[str, str]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet shards need pyarrow: pip install 'resnet-toolkit[ray]'") from None
    table = pa.table({name: pa.array(list(columns[name]), type=_arrow_type(kind))
                      for name, kind in kinds.items()})
    pq.write_table(table, path)


def _read_parquet(path: Path) -> Columns:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def _csv_text(columns: Columns, kinds: Mapping[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(kinds))
    for row in zip(*(columns[name] for name in kinds)):
        writer.writerow([json.dumps(v) if kind not in _SCALARS else repr(v) if kind == "float" else v
                         for v, kind in zip(row, kinds.values())])
    return buffer.getvalue()


def _read_csv(path: Path, kinds: Mapping[str, str]) -> Columns:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    names = rows[0]
    out: Columns = {name: [] for name in names}
    for row in rows[1:]:
        for name, text in zip(names, row):
            kind = kinds[name]
            out[name].append(_SCALARS[kind](text) if kind in _SCALARS else json.loads(text))
    return out


# --- predict results <-> columns ---------------------------------------------------------------------

def predict_columns(results: Sequence[Mapping[str, Any]], start: int) -> Columns:
    """predict()'s answers -> shard columns (rows numbered from `start`)."""
    tops = [r.get("top", []) for r in results]
    return {"index": list(range(start, start + len(results))), "input": [r["input"] for r in results],
            "classes": [[t["class"] for t in top] for top in tops],
            "indices": [[t["index"] for t in top] for top in tops],
            "probabilities": [[t["probability"] for t in top] for top in tops],
            "error": [r.get("error", "") for r in results]}


def predict_results(columns: Columns) -> list[dict[str, Any]]:
    """Shard columns -> predict()'s answers: {"input", "top": [...]} or {"input", "error"}."""
    results: list[dict[str, Any]] = []
    for name, classes, indices, probs, error in zip(columns["input"], columns["classes"], columns["indices"],
                                                    columns["probabilities"], columns["error"]):
        if error:
            results.append({"input": name, "error": error})
        else:
            results.append({"input": name, "top": [{"class": c, "index": int(i), "probability": float(p)}
                                                   for c, i, p in zip(classes, indices, probs)]})
    return results


def write_predictions(output_dir: Path, job: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                      shard_size: int = DEFAULT_SHARD_SIZE, fmt: str = "parquet") -> ShardStore:
    """All of predict()'s answers at once, in the shard layout (the local engine's --output-dir)."""
    store = ShardStore(output_dir, job, len(results), PREDICT_COLUMNS, shard_size, fmt)
    for shard in store.pending():
        start, stop = store.bounds(shard)
        part = results[start:stop]
        store.write(shard, predict_columns(part, start), {"errors": sum("error" in r for r in part)})
    store.finish()
    return store
