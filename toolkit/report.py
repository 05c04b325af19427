"""Render reports for people: rich terminal tables, CSV, PNG plots and a self-contained HTML page.

JSON is each report's own `to_dict`. matplotlib is imported only when a plot is drawn (Agg backend),
so the CLI's start-up and `toolkit predict` stay light.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .card import ModelCard
    from .evaluate import EvalReport
    from .validate import ValidationReport

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow"}


def _print_facts(rows: Iterable[tuple[str, Any]], console: Any) -> None:
    """A two-column label/value table; empty values are left out, user text is escaped."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for label, value in rows:
        if value not in (None, ""):
            table.add_row(label, escape(str(value)))
    console.print(table)


def _triple(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def card_rows(card: ModelCard) -> list[tuple[str, Any]]:
    """What a person wants to know of a card: classes and exactly how inputs are prepared."""
    names = card.class_names
    return [
        ("classes", f"{card.num_classes}: " + ", ".join(names[:10]) + (" …" if len(names) > 10 else "")),
        ("preprocess", f"resize {card.resize_size} ({card.interpolation}), centre crop "
                       f"{card.height}x{card.width}, mean {_triple(card.mean)}, std {_triple(card.std)}"),
    ]


def render_validation(report: ValidationReport, console: Any) -> None:
    from rich.markup import escape

    verdict = "[bold green]VALID[/]" if report.valid else "[bold red]INVALID[/]"
    console.print(f"{verdict}  {escape(report.path)}")
    rows: list[tuple[str, Any]] = [
        ("architecture", report.arch),
        ("family / stem", f"{report.family} / {report.stem}"),
        ("depth", report.depth),
        ("shortcut", report.shortcut),
        ("parameters", f"{report.parameters / 1e6:.2f}M" if report.parameters else None),
        ("stored as", ", ".join(filter(None, [
            f"under '{report.wrapper}'" if report.wrapper else "plain state_dict",
            f"prefix '{report.prefix}' stripped" if report.prefix else "",
            f"{report.layout} key layout" if report.layout else "",
        ]))),
        ("sha256", report.sha256[:16] + "…" if report.sha256 else None),
    ]
    rows += card_rows(report.card) if report.card is not None else [("classes", report.num_classes)]
    if report.accuracy is not None:
        rows.append(("accuracy", f"{report.accuracy:.4f} top-1 on {report.accuracy_samples} images"))
    _print_facts(rows, console)
    if not report.problems:
        console.print("[green]no problems found[/]")
    for problem in report.problems:
        style = SEVERITY_STYLE[problem.severity]
        console.print(f"[{style}]{problem.severity}[/] [dim]{problem.code}[/]: {escape(problem.message)}")


def render_info(facts: dict[str, Any], console: Any) -> None:
    """`toolkit info`: the artifact's facts, then its card."""
    from .card import ModelCard

    def shapes(key: str) -> str:
        return ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in facts.get(key, []))

    card = ModelCard.from_dict(facts["card"]) if facts.get("card") else None
    rows: list[tuple[str, Any]] = [
        ("path", facts.get("path")), ("format", facts.get("format")), ("precision", facts.get("precision")),
        ("architecture", card.arch if card else None), ("inputs", shapes("inputs")), ("outputs", shapes("outputs")),
        ("opset", facts.get("opset")), ("TensorRT", facts.get("tensorrt_version")), ("GPU", facts.get("gpu")),
        ("compute capability", facts.get("compute_capability")), ("profile", facts.get("profile")),
        ("producer", facts.get("producer")), ("calibration", facts.get("calibration")),
        *(card_rows(card) if card else []),
        ("source sha256", (card.source_sha256 or "")[:16] or None if card else None),
        ("size", f"{facts['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in facts else None),
    ]
    _print_facts(rows, console)


# --- progress -------------------------------------------------------------------------------------

@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool | None = None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar with images/s on stderr; yields an `advance(n)` callback, or None when off.

    Off unless stderr is a terminal (pipes, CI logs and `--json` output stay clean).
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")
        start = time.perf_counter()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            elapsed = time.perf_counter() - start
            bar.update(task, advance=n, rate=f"{done / elapsed:,.0f} img/s" if elapsed > 0 else "")

        yield advance


# --- eval --------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_eval(report: EvalReport, console: Any, max_class_rows: int = 100) -> None:
    """Per-class rows, the three averages, and speed (end-to-end vs model-only)."""
    from rich.markup import escape
    from rich.table import Table

    data = report.to_dict()
    console.print(f"[bold]{escape(report.model)}[/] on [bold]{escape(report.dataset)}[/]  "
                  f"[dim]({report.backend}, {report.device}, {report.precision}, {data['num_samples']} images)[/]")
    table = Table(show_edge=False, header_style="bold")
    table.add_column("class")
    for name in ("precision", "recall", "f1"):
        table.add_column(name, justify="right")
    table.add_column("support", justify="right")
    rows = data["per_class"]
    shown = rows if len(rows) <= max_class_rows else sorted(rows, key=lambda r: r["f1"])[:max_class_rows]
    for row in shown:
        style = "red" if row["support"] and row["f1"] < 0.5 else None
        table.add_row(escape(row["class"]), f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      str(row["support"]), style=style)
    if len(shown) < len(rows):
        table.add_row(f"[dim]… {len(rows) - len(shown)} more classes (lowest F1 shown)[/]", "", "", "", "")
    table.add_section()
    for kind in ("macro", "micro", "weighted"):
        avg = data[kind]
        table.add_row(f"[bold]{kind} avg[/]", f"{avg['precision']:.4f}", f"{avg['recall']:.4f}", f"{avg['f1']:.4f}",
                      str(data["num_samples"]))
    console.print(table)
    speed = (f"{report.images_per_second:,.0f} img/s end-to-end, {report.model_images_per_second:,.0f} img/s "
             f"model-only (batch {report.batch_size}, {report.timing.total_seconds:.2f} s in all)")
    console.print(f"[bold]accuracy[/] {_pct(data['accuracy'])}   [bold]top-5[/] {_pct(data['top5'])}   "
                  f"[dim]{speed}[/]")


# --- predict ------------------------------------------------------------------------------------------

def render_predictions(results: Sequence[dict[str, Any]], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    longest = max((len(str(r["input"])) for r in results), default=5)
    table.add_column("input", overflow="fold", min_width=min(longest, 60))  # paths stay on one line
    table.add_column("prediction")
    table.add_column("probability", justify="right")
    table.add_column("runners-up", style="dim")
    for result in results:
        if "error" in result:
            table.add_row(escape(result["input"]), "[red]error[/]", "", f"[red]{escape(result['error'])}[/]")
            continue
        best, rest = result["top"][0], result["top"][1:]
        others = ", ".join(f"{escape(t['class'])} {t['probability']:.3f}" for t in rest)
        table.add_row(escape(result["input"]), escape(best["class"]), f"{best['probability']:.4f}", others)
    console.print(table)


def predictions_csv(results: Sequence[dict[str, Any]]) -> str:
    """input,rank,class,index,probability,error — one row per (input, rank); errors get one row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["input", "rank", "class", "index", "probability", "error"])
    for result in results:
        if "error" in result:
            writer.writerow([result["input"], "", "", "", "", result["error"]])
        for rank, top in enumerate(result.get("top", []), 1):
            writer.writerow([result["input"], rank, top["class"], top["index"], f"{top['probability']:.6f}", ""])
    return buffer.getvalue()


# --- output directory: metrics.json, CSVs, plots, report.html -------------------------------------

def _matplotlib() -> Any | None:
    """pyplot on the Agg backend, or None (with a one-line notice) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed, so no plots were drawn (pip install 'resnet-toolkit[plots]')",
              file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a PNG atomically and release the figure (pyplot keeps every open one alive)."""
    from .fileio import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        _matplotlib().close(fig)
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path | None:
    """Row-normalised confusion matrix (recall on the diagonal) with counts where they fit."""
    plt = _matplotlib()
    if plt is None:
        return None
    n = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows != 0)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= 30:
        ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), labels=class_names)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return save_figure(fig, path)


def plot_per_class_f1(per_class: Sequence[dict[str, Any]], path: Path) -> Path | None:
    plt = _matplotlib()
    if plt is None:
        return None
    names = [row["class"] for row in per_class]
    f1 = [row["f1"] for row in per_class]
    fig, ax = plt.subplots(figsize=(max(6, min(0.3 * len(names) + 2, 40)), 4))
    ax.bar(range(len(names)), f1, color=["#d62728" if v < 0.5 else "#1f77b4" for v in f1])
    if len(names) <= 50:
        ax.set_xticks(range(len(names)), labels=names, rotation=90 if len(names) > 10 else 0)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("F1")
    ax.set_title("per-class F1")
    return save_figure(fig, path)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_html(data: dict[str, Any], images: dict[str, Path]) -> str:
    """A self-contained page: summary, averages, per-class table, plots embedded as base64."""
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))

    summary = [(key, fmt(data.get(key))) for key in ("model", "backend", "device", "precision", "dataset",
                                                      "num_samples", "accuracy", "top5", "images_per_second",
                                                      "model_images_per_second", "batch_size")]
    averages = [(kind, fmt(data[kind]["precision"]), fmt(data[kind]["recall"]), fmt(data[kind]["f1"]))
                for kind in ("macro", "micro", "weighted")]
    classes = [(r["class"], fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"]) for r in data["per_class"]]
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, path in images.items()
    )
    style = ("body{font-family:system-ui,sans-serif;margin:2rem;color:#222}table{border-collapse:collapse;"
             "margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1rem 0}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>toolkit eval report</title>"
        f"<style>{style}</style></head><body><h1>Evaluation report</h1>"
        f"{_html_table(['field', 'value'], summary)}<h2>Averages</h2>"
        f"{_html_table(['average', 'precision', 'recall', 'f1'], averages)}<h2>Plots</h2>{figures}"
        f"<h2>Per class</h2>{_html_table(['class', 'precision', 'recall', 'f1', 'support'], classes)}"
        "</body></html>\n"
    )


def write_eval_outputs(report: EvalReport, output_dir: str | Path) -> dict[str, Path]:
    """metrics.json, predictions.csv, confusion_matrix.csv, two PNGs and report.html (atomic writes)."""
    from .fileio import atomic_write_text

    out = Path(output_dir)
    data = report.to_dict()
    written = {"metrics": atomic_write_text(out / "metrics.json", json.dumps(data, indent=2) + "\n")}

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "input", "label", "predicted", "confidence"])
    writer.writerows((i, name, label, pred, f"{conf:.6f}") for i, name, label, pred, conf in report.prediction_rows())
    written["predictions"] = atomic_write_text(out / "predictions.csv", buffer.getvalue())

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *report.class_names])
    writer.writerows([name, *row] for name, row in zip(report.class_names, report.metrics.matrix.tolist()))
    written["confusion_matrix_csv"] = atomic_write_text(out / "confusion_matrix.csv", buffer.getvalue())

    images: dict[str, Path] = {}
    cm_png = plot_confusion_matrix(report.metrics.matrix, report.class_names, out / "confusion_matrix.png")
    if cm_png is not None:
        images["confusion matrix"] = written["confusion_matrix_png"] = cm_png
    f1_png = plot_per_class_f1(data["per_class"], out / "per_class_f1.png")
    if f1_png is not None:
        images["per-class F1"] = written["per_class_f1_png"] = f1_png
    written["html"] = atomic_write_text(out / "report.html", eval_html(data, images))
    return written


# --- benchmark ------------------------------------------------------------------------------------

def render_benchmark(result: dict[str, Any], console: Any) -> None:
    """One row per format x precision: status, size, accuracy, macro-F1, agreement, latency, speed."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(result['model'])}[/] on [bold]{escape(result['dataset'])}[/] "
                  f"[dim]({result['num_samples']} images, {result['device']}, batch sizes "
                  f"{', '.join(map(str, result['batch_sizes']))})[/]")
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (("format", "left"), ("status", "left"), ("size", "right"), ("accuracy", "right"),
                          ("macro-F1", "right"), ("agree", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
                          ("img/s", "right"), ("batch", "right"), ("speed-up", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in result["rows"]:
        status = {"ok": "[green]ok[/]", "skipped": "[dim]skipped[/]"}.get(row["status"], f"[red]{row['status']}[/]")
        size = row.get("size_bytes")
        table.add_row(
            escape(row["name"]), status, "-" if size is None else f"{size / 1e6:.2f}M",
            _pct(row.get("accuracy")), num(row.get("macro_f1"), ".4f"), _pct(row.get("agreement")),
            num(row.get("latency_ms_p50"), ".2f"), num(row.get("latency_ms_p99"), ".2f"),
            num(row.get("throughput"), ",.0f"), num(row.get("best_batch_size"), "d"),
            "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
        )
    if not console.is_terminal and console.width < 140:  # logs and pipes: do not squeeze 11 columns into 80
        console.width = 140
    console.print(table)
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]{escape(row['name'])}[/]: {escape(row['error'])}")
    for path in result.get("files", []):
        console.print(f"wrote {escape(path)}")
