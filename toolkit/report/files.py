"""The report folders of eval and compare: JSON, CSV, figures and the page, swapped in whole or not at all."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .figures import plot_confusion_matrix, plot_per_class_f1, plot_reliability, pyplot
from .formatting import pct
from .html_page import GALLERY_LIMIT, compare_html, eval_html, gallery_html

if TYPE_CHECKING:  # pragma: no cover
    from ..compare import Comparison
    from ..evaluate import EvalReport

EVAL_FILES = {"metrics": "metrics.json", "predictions": "predictions.csv", "errors": "errors.csv",
              "confusion_matrix_csv": "confusion_matrix.csv", "confusion_matrix_png": "confusion_matrix.png",
              "per_class_f1_png": "per_class_f1.png", "reliability_png": "reliability_diagram.png",
              "html": "report.html"}
COMPARE_FILES = {"comparison": "comparison.json", "disagreements": "disagreements.csv",
                 "per_class": "per_class_deltas.csv", "html": "report.html"}


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def error_rows(report: EvalReport) -> list[tuple[int, int, str, str, str, str, str]]:
    """(rank, index, input, label, predicted, confidence, p(true)) for every mistake, most confident first."""
    names = report.class_names
    return [(rank, int(i), report.ids[i], names[int(report.labels[i])], names[int(report.predictions[i])],
             f"{report.confidences[i]:.6f}", f"{report.true_probabilities[i]:.6f}")
            for rank, i in enumerate(report.misclassified(), 1)]


def check_output_dir(folder: Path, expected: Iterable[str]) -> None:
    """An existing --output-dir is replaced whole, so it may hold only a previous report's files."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UsageError(f"--output-dir {folder} is a file; give a folder for the report")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in set(expected))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
        raise UsageError(f"--output-dir {folder} holds files that are not part of a report ({shown}); "
                         "it would be replaced whole: choose a new or empty folder")


@contextlib.contextmanager
def report_folder(folder: Path, expected: Iterable[str], keep: Sequence[str] = ()) -> Iterator[Path]:
    """Stage a report folder and swap it in whole; a full disk is one line naming the folder.

    `keep` names sub-folders of the old folder that outlive the report (e.g. Ray's `predictions/`
    shards): they are hard-linked into the staging folder just before the swap, so a failed or killed
    swap still leaves the old folder, shards included, exactly as it was.
    """
    from ..errors import NoSpaceError
    from ..fileio import atomic_directory

    check_output_dir(folder, [*expected, *keep])
    try:
        with atomic_directory(folder, kind="report") as staging:
            yield staging
            for name in keep:
                if (folder / name).is_dir():
                    shutil.copytree(folder / name, staging / name, symlinks=True, copy_function=os.link)
    except NoSpaceError:
        raise NoSpaceError(f"no space left on {folder}") from None


def write_eval_outputs(report: EvalReport, output_dir: str | Path,
                       gallery_limit: int = GALLERY_LIMIT, keep: Sequence[str] = ()) -> dict[str, Path]:
    """metrics.json, predictions.csv, errors.csv, confusion_matrix.csv, three PNGs and report.html.

    The set is written into a staging folder and swapped in whole: an interrupted or failed run leaves
    the previous report (or nothing) at `output_dir`, never a mixture. Sub-folders named in `keep`
    carry over (see `report_folder`).
    """
    out = Path(output_dir)
    data = report.to_dict()
    names = report.class_names
    with report_folder(out, EVAL_FILES.values(), keep) as stage:
        def path(key: str) -> Path:
            return stage / EVAL_FILES[key]

        path("metrics").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        predictions = ((i, name, label, pred, f"{conf:.6f}")
                       for i, name, label, pred, conf in report.prediction_rows())
        header = ["index", "input", "label", "predicted", "confidence"]
        path("predictions").write_text(csv_text(header, predictions), encoding="utf-8")
        errors = error_rows(report)
        path("errors").write_text(csv_text(["rank", "index", "input", "label", "predicted", "confidence",
                                        "true_class_probability"], errors), encoding="utf-8")
        path("confusion_matrix_csv").write_text(csv_text(["true \\ predicted", *names], (
            [name, *row] for name, row in zip(names, report.metrics.matrix.tolist()))), encoding="utf-8")
        plots: dict[str, Path | None] = {}
        if pyplot() is not None:
            plots["reliability diagram"] = plot_reliability(data["calibration"], path("reliability_png"))
            plots["confusion matrix"] = plot_confusion_matrix(report.metrics.matrix, names,
                                                              path("confusion_matrix_png"))
            plots["per-class F1"] = plot_per_class_f1(data["per_class"], path("per_class_f1_png"))
        images = {title: png for title, png in plots.items() if png is not None}
        shown = errors[:gallery_limit]
        gallery = gallery_html(report.data, [
            (index, name, [(f"true {label}", "right"), (f"predicted {pred}", "wrong"),
                           (f"confidence {pct(float(conf), 1)}", "muted")])
            for _rank, index, name, label, pred, conf, _p in shown])
        note = (f"The {len(shown):,} most confident of {len(errors):,} mistakes"
                + ("" if len(shown) == len(errors) else " (all of them in errors.csv)") + "." if errors
                else "No mistakes.")
        path("html").write_text(eval_html(data, images, gallery, note), encoding="utf-8")
        produced = {key for key in EVAL_FILES if path(key).exists()}
    return {key: out / EVAL_FILES[key] for key in EVAL_FILES if key in produced}



def predictions_csv(results: Sequence[dict[str, Any]]) -> str:
    """input,rank,class,index,probability,error — one row per (input, rank); errors get one row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["input", "rank", "class", "index", "probability", "error"])
    for result in results:
        if "error" in result:
            writer.writerow([result["input"], "", "", "", "", result["error"]])
        for rank, top in enumerate(result.get("top", []), 1):
            writer.writerow([result["input"], rank, top["class"], top["index"], f"{top['probability']:.6f}",
                             ""])
    return buffer.getvalue()


def write_compare_outputs(comparison: Comparison, output_dir: str | Path,
                          gallery_limit: int = GALLERY_LIMIT) -> dict[str, Path]:
    """comparison.json, disagreements.csv, per_class_deltas.csv and report.html, swapped in whole."""
    out = Path(output_dir)
    data = comparison.to_dict()
    rows = data["disagreements"]
    with report_folder(out, COMPARE_FILES.values()) as stage:
        (stage / COMPARE_FILES["comparison"]).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        header = ["index", "input", "label", "a_predicted", "a_confidence", "b_predicted", "b_confidence"]
        disagreements = ([r["index"], r["input"], r["label"], r["a_predicted"], f"{r['a_confidence']:.6f}",
                          r["b_predicted"], f"{r['b_confidence']:.6f}"] for r in rows)
        (stage / COMPARE_FILES["disagreements"]).write_text(csv_text(header, disagreements), encoding="utf-8")
        keys = ["class", "support",
                *(f"{m}_{s}" for m in ("precision", "recall", "f1") for s in ("a", "b", "delta"))]
        deltas = ([r[k] if isinstance(r[k], (str, int)) else f"{r[k]:.6f}" for k in keys]
                  for r in data["per_class"])
        (stage / COMPARE_FILES["per_class"]).write_text(csv_text(keys, deltas), encoding="utf-8")

        def answer(r: dict[str, Any], side: str) -> tuple[str, str]:
            predicted = r[f"{side}_predicted"]
            text = f"{side.upper()}: {predicted} ({pct(r[f'{side}_confidence'], 1)})"
            return text, "right" if predicted == r["label"] else "wrong"

        shown = rows[:gallery_limit]
        gallery = gallery_html(comparison.a.data, [
            (r["index"], r["input"], [(f"true {r['label']}", "muted"), answer(r, "a"), answer(r, "b")])
            for r in shown])
        note = (f"The {len(shown):,} most confident of {len(rows):,} disagreements"
                + ("" if len(shown) == len(rows) else " (all of them in disagreements.csv)") + "." if rows
                else "The two models give the same top-1 answer on every image.")
        (stage / COMPARE_FILES["html"]).write_text(compare_html(comparison, gallery, note), encoding="utf-8")
    return {key: out / name for key, name in COMPARE_FILES.items()}
