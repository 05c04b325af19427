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
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .card import ModelCard
    from .compare import Comparison
    from .data import Dataset
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
        rows.append(("accuracy", f"{report.accuracy:.4f} top-1 on {report.accuracy_samples} images"
                     f" ({report.accuracy_precision or 'fp32'} on {report.accuracy_device or 'cpu'})"))
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
        ("architecture", card.arch if card else None), ("inputs", shapes("inputs")),
        ("outputs", shapes("outputs")),
        ("opset", facts.get("opset")), ("TensorRT", facts.get("tensorrt_version")), ("GPU", facts.get("gpu")),
        ("compute capability", facts.get("compute_capability")), ("profile", facts.get("profile")),
        ("exporter", facts.get("exporter")), ("producer", facts.get("producer")),
        ("calibration", facts.get("calibration")),
        *(card_rows(card) if card else []),
        ("source sha256", (card.source_sha256 or "")[:16] or None if card else None),
        ("size", f"{facts['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in facts else None),
    ]
    _print_facts(rows, console)


# --- progress -------------------------------------------------------------------------------------

@contextlib.contextmanager
def progress_bar(total: int, description: str,
                 enabled: bool | None = None) -> Iterator[Callable[[int], None] | None]:
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


# --- numbers for people (full precision stays in the JSON) ----------------------------------------

def _pct(value: float | None, digits: int = 2) -> str:
    """0.99721 -> '99.72 %'; None -> '-'."""
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def _rate(value: float | None) -> str:
    """3376.5968 -> '3,377 img/s'."""
    return "-" if value is None else f"{value:,.0f} img/s"


def _number(value: Any) -> str:
    """Integers with thousands separators, other floats to 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def calibration_line(calibration: dict[str, Any]) -> str:
    """'ECE 2.31 %, MCE 9.80 %, NLL 0.0712, Brier 0.0301 (15 bins)'."""
    return (f"ECE {_pct(calibration['ece'])}, MCE {_pct(calibration['mce'])}, "
            f"NLL {_number(calibration['nll'])}, Brier {_number(calibration['brier'])} "
            f"({calibration['n_bins']} bins)")


def speed_line(report: EvalReport) -> str:
    return (f"{_rate(report.images_per_second)} end-to-end, {_rate(report.model_images_per_second)} "
            f"model-only (batch {report.batch_size:,}, {report.timing.total_seconds:,.2f} s in all)")


# --- eval --------------------------------------------------------------------------------------------

def render_eval(report: EvalReport, console: Any, max_class_rows: int = 100, max_confusions: int = 5) -> None:
    """Per-class rows, the three averages, calibration, the commonest confusions and speed."""
    from rich.markup import escape
    from rich.table import Table

    data = report.to_dict()
    console.print(f"[bold]{escape(report.model)}[/] on [bold]{escape(report.dataset)}[/]  "
                  f"[dim]({report.backend}, {report.device}, {report.precision}, "
                  f"{data['num_samples']:,} images)[/]")
    table = Table(show_edge=False, header_style="bold")
    table.add_column("class")
    for name in ("precision", "recall", "f1"):
        table.add_column(name, justify="right")
    table.add_column("support", justify="right")
    rows = data["per_class"]
    shown = rows if len(rows) <= max_class_rows else sorted(rows, key=lambda r: r["f1"])[:max_class_rows]
    for row in shown:
        style = "red" if row["support"] and row["f1"] < 0.5 else None
        table.add_row(escape(row["class"]), f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                      f"{row['f1']:.4f}", f"{row['support']:,}", style=style)
    if len(shown) < len(rows):
        table.add_row(f"[dim]… {len(rows) - len(shown)} more classes (lowest F1 shown)[/]", "", "", "", "")
    table.add_section()
    for kind in ("macro", "micro", "weighted"):
        avg = data[kind]
        table.add_row(f"[bold]{kind} avg[/]", f"{avg['precision']:.4f}", f"{avg['recall']:.4f}",
                      f"{avg['f1']:.4f}", f"{data['num_samples']:,}")
    console.print(table)
    console.print(f"[bold]accuracy[/] {_pct(data['accuracy'])}   [bold]top-5[/] {_pct(data['top5'])}   "
                  f"[dim]{speed_line(report)}[/]")
    console.print(f"[bold]calibration[/] {calibration_line(data['calibration'])}")
    errors = data["errors"]
    if errors["top_confusions"]:
        common = ", ".join(f"{escape(c['true'])} → {escape(c['predicted'])} ({c['count']:,})"
                           for c in errors["top_confusions"][:max_confusions])
        console.print(f"[bold]errors[/] {errors['misclassified']:,}; most frequent: {common}")


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
            writer.writerow([result["input"], rank, top["class"], top["index"], f"{top['probability']:.6f}",
                             ""])
    return buffer.getvalue()


# --- output directory: metrics.json, CSVs, plots, report.html -------------------------------------

EVAL_FILES = {"metrics": "metrics.json", "predictions": "predictions.csv", "errors": "errors.csv",
              "confusion_matrix_csv": "confusion_matrix.csv", "confusion_matrix_png": "confusion_matrix.png",
              "per_class_f1_png": "per_class_f1.png", "reliability_png": "reliability_diagram.png",
              "html": "report.html"}
GALLERY_LIMIT = 64  # thumbnails in a report page: enough to see a pattern, small enough to open fast
THUMBNAIL_SIZE = 96


def _matplotlib() -> Any | None:
    """pyplot on the Agg backend, or None (with a one-line notice) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed, so no plots were drawn "
              "(pip install 'resnet-toolkit[plots]')", file=sys.stderr)
        return None
    return plt


def _literal_text(plt: Any) -> Any:
    """Plot labels are user text (class names, paths): never mathtext or TeX, so `$\\foo{$` is drawn as is."""
    return plt.rc_context({"text.parse_math": False, "text.usetex": False})


def save_figure(fig: Any, path: Path) -> Path:
    """Write a PNG atomically and release the figure (pyplot keeps every open one alive)."""
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
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
    with _literal_text(plt):
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
    with _literal_text(plt):
        fig, ax = plt.subplots(figsize=(max(6, min(0.3 * len(names) + 2, 40)), 4))
        ax.bar(range(len(names)), f1, color=["#d62728" if v < 0.5 else "#1f77b4" for v in f1])
        if len(names) <= 50:
            ax.set_xticks(range(len(names)), labels=names, rotation=90 if len(names) > 10 else 0)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("F1")
        ax.set_title("per-class F1")
        return save_figure(fig, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> Path | None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and the count in each bin."""
    plt = _matplotlib()
    if plt is None:
        return None
    bins = calibration["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    accuracy = np.array([b["accuracy"] or 0.0 for b in bins])
    confidence = np.array([b["confidence"] or 0.0 for b in bins])
    filled = counts > 0
    with _literal_text(plt):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
        top.plot([0, 1], [0, 1], "--", color="#888", linewidth=1, label="perfect calibration")
        top.bar(lower[filled], accuracy[filled], width=width[filled], align="edge", color="#1f77b4",
                edgecolor="white", label="accuracy in bin")
        top.bar(lower[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled],
                width=width[filled], align="edge", fill=False, hatch="///", edgecolor="#d62728",
                linewidth=0.8, label="gap to mean confidence")
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"reliability diagram — ECE {_pct(calibration['ece'])}, MCE {_pct(calibration['mce'])}")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(lower, counts, width=width, align="edge", color="#7f7f7f", edgecolor="white")
        for x, w, c in zip(lower[filled], width[filled], counts[filled]):
            bottom.text(x + w / 2, c, f"{c:,}", ha="center", va="bottom", fontsize=7)
        bottom.set_ylim(0, max(1, counts.max()) * 1.3)
        bottom.set_ylabel("images")
        bottom.set_xlabel("confidence (top-1 probability)")
        bottom.set_xlim(0, 1)
        return save_figure(fig, path)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure_html(title: str, path: Path) -> str:
    return (f'<figure><img alt="{html.escape(title)}" src="{_png_uri(path.read_bytes())}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def thumbnail_png(data: Dataset, index: int, size: int = THUMBNAIL_SIZE) -> bytes | None:
    """A small PNG of input `index` (tiny images scaled up by whole pixels), or None if it cannot be read."""
    from PIL import Image

    from .errors import ToolkitError
    from .images import decode_image

    try:
        if data.images is not None:
            image = Image.fromarray(np.asarray(data.images[index], dtype=np.uint8))
        else:
            image = decode_image(data.paths[index], draft_size=(size, size))
    except (ToolkitError, OSError, ValueError, IndexError):
        return None
    image = image.convert("RGB")
    longest = max(image.size)
    if longest < size // 2:  # digits and CIFAR: crisp blocks, not blur
        factor = size // longest
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    else:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def gallery_html(data: Dataset | None, items: Sequence[tuple[int, str, Sequence[tuple[str, str]]]]) -> str:
    """A grid of thumbnails, each with its input name (tooltip) and caption lines (text, css class)."""
    cells = []
    for index, name, lines in items:
        png = thumbnail_png(data, index) if data is not None else None
        image = (f'<img src="{_png_uri(png)}" alt="{html.escape(name)}">' if png
                 else '<div class="missing">no preview</div>')
        caption = "".join(f'<div class="{css}">{html.escape(text)}</div>' for text, css in lines)
        cells.append(f'<figure class="thumb" title="{html.escape(name)}">{image}<figcaption>{caption}'
                     f"</figcaption></figure>")
    return f'<div class="gallery">{"".join(cells)}</div>'


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
    "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1rem 0}"
    ".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:.75rem}"
    ".thumb{margin:0;padding:.4rem;border:1px solid #ddd;border-radius:6px;font-size:12px;text-align:center}"
    ".thumb img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#f4f4f4}"
    ".thumb .missing{width:96px;height:96px;margin:auto;line-height:96px;background:#f4f4f4;color:#999}"
    ".right{color:#1a7f37}.wrong{color:#c0392b}.muted{color:#666}.verdict{font-size:1.1rem}"
)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{body}</body></html>\n")


def eval_html(data: dict[str, Any], images: dict[str, Path], gallery: str = "",
              gallery_note: str = "") -> str:
    """A self-contained page: summary, averages, calibration, confusions, mistakes, plots, per-class table."""
    f = _number
    summary = [("model", data["model"]), ("backend", data["backend"]), ("device", data["device"]),
               ("precision", data["precision"]), ("dataset", data["dataset"]),
               ("images", f(data["num_samples"])), ("accuracy", _pct(data["accuracy"])),
               ("top-5", _pct(data["top5"])), ("speed, end-to-end", _rate(data["images_per_second"])),
               ("speed, model only", _rate(data["model_images_per_second"])),
               ("batch size", f(data["batch_size"]))]
    averages = [(kind, f(data[kind]["precision"]), f(data[kind]["recall"]), f(data[kind]["f1"]))
                for kind in ("macro", "micro", "weighted")]
    cal = data["calibration"]
    calibration = [("expected calibration error (ECE)", _pct(cal["ece"])),
                   ("maximum calibration error (MCE)", _pct(cal["mce"])),
                   ("negative log-likelihood (NLL)", f(cal["nll"])), ("Brier score", f(cal["brier"]))]
    confusions = [(c["true"], c["predicted"], f(c["count"]), _pct(c["share"]), _pct(c["true_class_rate"]))
                  for c in data["errors"]["top_confusions"]]
    classes = [(r["class"], f(r["precision"]), f(r["recall"]), f(r["f1"]), f(r["support"]))
               for r in data["per_class"]]
    reliability = {k: v for k, v in images.items() if k == "reliability diagram"}
    other = {k: v for k, v in images.items() if k != "reliability diagram"}
    return _page("toolkit eval report", (
        "<h1>Evaluation report</h1>"
        f"{_html_table(['field', 'value'], summary)}<h2>Averages</h2>"
        f"{_html_table(['average', 'precision', 'recall', 'f1'], averages)}"
        "<h2>Calibration</h2><p class='muted'>Can the confidences be trusted? "
        f"{cal['n_bins']} equal-width bins of the top-1 probability; a well calibrated model is right "
        "80 % of the time when it says 0.8.</p>"
        f"{_html_table(['figure', 'value'], calibration)}"
        f"{''.join(_figure_html(t, p) for t, p in reliability.items())}"
        f"<h2>Most frequent confusions</h2><p>{f(data['errors']['misclassified'])} of "
        f"{f(data['num_samples'])} images misclassified.</p>"
        f"{_html_table(['true', 'predicted', 'count', 'share of errors', 'share of true class'], confusions)}"
        f"<h2>Most confident mistakes</h2><p class='muted'>{html.escape(gallery_note)}</p>{gallery}"
        f"<h2>Plots</h2>{''.join(_figure_html(t, p) for t, p in other.items())}"
        f"<h2>Per class</h2>{_html_table(['class', 'precision', 'recall', 'f1', 'support'], classes)}"
    ))


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
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
    from .errors import NoSpaceError
    from .fileio import atomic_directory

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
        path("predictions").write_text(_csv(header, predictions), encoding="utf-8")
        errors = error_rows(report)
        path("errors").write_text(_csv(["rank", "index", "input", "label", "predicted", "confidence",
                                        "true_class_probability"], errors), encoding="utf-8")
        path("confusion_matrix_csv").write_text(_csv(["true \\ predicted", *names], (
            [name, *row] for name, row in zip(names, report.metrics.matrix.tolist()))), encoding="utf-8")
        plots: dict[str, Path | None] = {}
        if _matplotlib() is not None:
            plots["reliability diagram"] = plot_reliability(data["calibration"], path("reliability_png"))
            plots["confusion matrix"] = plot_confusion_matrix(report.metrics.matrix, names,
                                                              path("confusion_matrix_png"))
            plots["per-class F1"] = plot_per_class_f1(data["per_class"], path("per_class_f1_png"))
        images = {title: png for title, png in plots.items() if png is not None}
        shown = errors[:gallery_limit]
        gallery = gallery_html(report.data, [
            (index, name, [(f"true {label}", "right"), (f"predicted {pred}", "wrong"),
                           (f"confidence {_pct(float(conf), 1)}", "muted")])
            for _rank, index, name, label, pred, conf, _p in shown])
        note = (f"The {len(shown):,} most confident of {len(errors):,} mistakes"
                + ("" if len(shown) == len(errors) else " (all of them in errors.csv)") + "." if errors
                else "No mistakes.")
        path("html").write_text(eval_html(data, images, gallery, note), encoding="utf-8")
        produced = {key for key in EVAL_FILES if path(key).exists()}
    return {key: out / EVAL_FILES[key] for key in EVAL_FILES if key in produced}


# --- compare ----------------------------------------------------------------------------------------

COMPARE_FILES = {"comparison": "comparison.json", "disagreements": "disagreements.csv",
                 "per_class": "per_class_deltas.csv", "html": "report.html"}
METRIC_LABELS = {"accuracy": "accuracy", "top5": "top-5", "macro_f1": "macro F1",
                 "weighted_f1": "weighted F1", "ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier",
                 "images_per_second": "speed"}
_PERCENT_METRICS = {"accuracy", "top5", "ece", "mce"}


def _metric(key: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed and value > 0 else ""
    if key in _PERCENT_METRICS:
        return f"{sign}{100 * value:.2f} pp" if signed else _pct(value)
    if key == "images_per_second":
        return f"{sign}{value:,.0f} img/s"
    return f"{sign}{value:.4f}"


def render_compare(comparison: Comparison, console: Any, max_class_rows: int = 30) -> None:
    """Both models' figures side by side (B - A), per-class F1 deltas, agreement and the McNemar verdict."""
    from rich.markup import escape
    from rich.table import Table

    data = comparison.to_dict()
    for side in ("a", "b"):
        model = data[side]
        console.print(f"[bold]{side.upper()}[/] {escape(model['model'])} "
                      f"[dim]({model['backend']}, {model['precision']})[/]")
    console.print(f"on [bold]{escape(data['dataset'])}[/] [dim]({data['num_samples']:,} images)[/]")
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (("metric", "left"), ("A", "right"), ("B", "right"), ("B - A", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in data["metrics"]:
        key = row["metric"]
        table.add_row(METRIC_LABELS[key], _metric(key, row["a"]), _metric(key, row["b"]),
                      _metric(key, row["delta"], signed=True))
    console.print(table)
    changed = sorted((r for r in data["per_class"] if r["f1_delta"]), key=lambda r: r["f1_delta"])
    if changed:
        classes = Table(show_edge=False, header_style="bold", title="per-class F1 that changed (B - A)")
        for name in ("class", "support", "F1 A", "F1 B", "delta"):
            classes.add_column(name, justify="left" if name == "class" else "right")
        for row in changed[:max_class_rows]:
            classes.add_row(escape(row["class"]), f"{row['support']:,}", f"{row['f1_a']:.4f}",
                            f"{row['f1_b']:.4f}", f"{row['f1_delta']:+.4f}",
                            style="red" if row["f1_delta"] < 0 else "green")
        console.print(classes)
    test = comparison.test
    console.print(f"[bold]top-1 agreement[/] {_pct(data['agreement'])} "
                  f"({len(data['disagreements']):,} images answered differently)")
    style = "bold yellow" if test.significant else "bold"
    console.print(f"[{style}]{escape(test.summary())}[/]")


def compare_html(comparison: Comparison, gallery: str, gallery_note: str) -> str:
    from .compare import format_p

    data = comparison.to_dict()
    test = comparison.test
    models = [("A", data["a"]["model"], data["a"]["backend"], data["a"]["precision"]),
              ("B", data["b"]["model"], data["b"]["backend"], data["b"]["precision"])]
    metrics = [(METRIC_LABELS[r["metric"]], _metric(r["metric"], r["a"]), _metric(r["metric"], r["b"]),
                _metric(r["metric"], r["delta"], signed=True)) for r in data["metrics"]]
    per_class = [(r["class"], f"{r['support']:,}", f"{r['f1_a']:.4f}", f"{r['f1_b']:.4f}",
                  f"{r['f1_delta']:+.4f}", f"{r['recall_delta']:+.4f}", f"{r['precision_delta']:+.4f}")
                 for r in data["per_class"]]
    class_header = ["class", "support", "F1 A", "F1 B", "F1 B - A", "recall B - A", "precision B - A"]
    outcomes = [("both right", f"{test.both_right:,}"), ("A right, B wrong", f"{test.a_only:,}"),
                ("A wrong, B right", f"{test.b_only:,}"), ("both wrong", f"{test.both_wrong:,}")]
    return _page("toolkit compare report", (
        f"<h1>Comparison on {html.escape(data['dataset'])}</h1>"
        f"{_html_table(['', 'model', 'backend', 'precision'], models)}"
        f"<p class='verdict'><strong>{html.escape(test.verdict.capitalize())}</strong> "
        f"(McNemar's exact test, p = {html.escape(format_p(test.p_value))}).</p>"
        f"{_html_table(['paired outcome', 'images'], outcomes)}"
        f"<p>Top-1 agreement {_pct(data['agreement'])} on {data['num_samples']:,} images.</p>"
        f"<h2>Side by side</h2>{_html_table(['metric', 'A', 'B', 'B - A'], metrics)}"
        f"<h2>Where they disagree</h2><p class='muted'>{html.escape(gallery_note)}</p>{gallery}"
        f"<h2>Per class</h2>"
        f"{_html_table(class_header, per_class)}"
    ))


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
        (stage / COMPARE_FILES["disagreements"]).write_text(_csv(header, disagreements), encoding="utf-8")
        keys = ["class", "support",
                *(f"{m}_{s}" for m in ("precision", "recall", "f1") for s in ("a", "b", "delta"))]
        deltas = ([r[k] if isinstance(r[k], (str, int)) else f"{r[k]:.6f}" for k in keys]
                  for r in data["per_class"])
        (stage / COMPARE_FILES["per_class"]).write_text(_csv(keys, deltas), encoding="utf-8")

        def answer(r: dict[str, Any], side: str) -> tuple[str, str]:
            predicted = r[f"{side}_predicted"]
            text = f"{side.upper()}: {predicted} ({_pct(r[f'{side}_confidence'], 1)})"
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


# --- benchmark ------------------------------------------------------------------------------------

def _p_value(p: float | None) -> str:
    """McNemar p-value for a table cell, starred below 0.05."""
    from .compare import ALPHA, format_p

    return "-" if p is None else format_p(p) + (" *" if p < ALPHA else "")


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
                          ("img/s", "right"), ("batch", "right"), ("speed-up", "right"),
                          ("p vs fp32", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in result["rows"]:
        status = {"ok": "[green]ok[/]", "skipped": "[dim]skipped[/]"}.get(row["status"],
                                                                          f"[red]{row['status']}[/]")
        size = row.get("size_bytes")
        table.add_row(
            escape(row["name"]), status, "-" if size is None else f"{size / 1e6:.2f}M",
            _pct(row.get("accuracy")), num(row.get("macro_f1"), ".4f"), _pct(row.get("agreement")),
            num(row.get("latency_ms_p50"), ".2f"), num(row.get("latency_ms_p99"), ".2f"),
            num(row.get("throughput"), ",.0f"), num(row.get("best_batch_size"), "d"),
            "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
            _p_value(row.get("mcnemar_p")),
        )
    if not console.is_terminal and console.width < 150:  # logs and pipes: do not squeeze 12 columns into 80
        console.width = 150
    console.print(table)
    console.print("[dim]p vs fp32: McNemar's exact test of each row's right/wrong answers against torch "
                  "eager fp32; below 0.05 (*) the accuracy difference is more than noise[/]")
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]{escape(row['name'])}[/]: {escape(row['error'])}")
    for path in result.get("files", []):
        console.print(f"wrote {escape(path)}")
