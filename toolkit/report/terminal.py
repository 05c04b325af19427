"""Reports in the terminal: rich tables and lines, and the progress bar (on stderr, only at a terminal).

rich is imported inside each function, so importing the report costs nothing until it renders.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .formatting import METRIC_LABELS, metric, number, p_value, pct, rate

if TYPE_CHECKING:  # pragma: no cover
    from ..card import ModelCard
    from ..compare import Comparison
    from ..evaluate import EvalReport
    from ..validate import ValidationReport

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


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
    if report.recognised:
        rows.append(("recognised", f"{report.recognised['publisher']} {report.recognised['name']}"))
    if report.recorded:
        from ..validate import recorded_text

        rows.append(("recorded", recorded_text(report.recorded)))
    if report.accuracy is not None:
        published = (f"; published {report.recognised['top1']:g} % on {report.recognised['dataset']}"
                     if report.recognised else "")
        images = report.accuracy_sampling or f"{report.accuracy_samples} images"
        rows.append(("accuracy", f"{report.accuracy:.2%} top-1 on {images}"
                     f" ({report.accuracy_precision or 'fp32'} on {report.accuracy_device or 'cpu'})"
                     f"{published}"))
    _print_facts(rows, console)
    if not report.problems:
        console.print("[green]no problems found[/]")
    for problem in report.problems:
        style = SEVERITY_STYLE[problem.severity]
        console.print(f"[{style}]{problem.severity}[/] [dim]{problem.code}[/]: {escape(problem.message)}")


def render_info(facts: dict[str, Any], console: Any) -> None:
    """`toolkit info`: the artifact's facts, then its card."""
    from ..card import ModelCard

    def shapes(key: str) -> str:
        return ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in facts.get(key, []))

    card = ModelCard.from_dict(facts["card"]) if facts.get("card") else None
    rows: list[tuple[str, Any]] = [
        ("path", facts.get("path")), ("format", facts.get("format")), ("precision", facts.get("precision")),
        ("architecture", card.arch if card else None), ("inputs", shapes("inputs")),
        ("outputs", shapes("outputs")),
        ("opset", facts.get("opset")), ("TensorRT", facts.get("tensorrt_version")), ("GPU", facts.get("gpu")),
        ("compute capability", facts.get("compute_capability")), ("profile", facts.get("profile")),
        ("torch", facts.get("torch_version")), ("device", facts.get("device")),
        ("CPU ISA", facts.get("cpu_isa")),
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



def calibration_line(calibration: dict[str, Any]) -> str:
    """'ECE 2.31 %, MCE 9.80 %, NLL 0.0712, Brier 0.0301 (15 bins)'."""
    return (f"ECE {pct(calibration['ece'])}, MCE {pct(calibration['mce'])}, "
            f"NLL {number(calibration['nll'])}, Brier {number(calibration['brier'])} "
            f"({calibration['n_bins']} bins)")


def speed_line(report: EvalReport) -> str:
    return (f"{rate(report.images_per_second)} end-to-end, {rate(report.model_images_per_second)} "
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
    console.print(f"[bold]accuracy[/] {pct(data['accuracy'])}   [bold]top-5[/] {pct(data['top5'])}   "
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
        table.add_row(METRIC_LABELS[key], metric(key, row["a"]), metric(key, row["b"]),
                      metric(key, row["delta"], signed=True))
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
    console.print(f"[bold]top-1 agreement[/] {pct(data['agreement'])} "
                  f"({len(data['disagreements']):,} images answered differently)")
    style = "bold yellow" if test.significant else "bold"
    console.print(f"[{style}]{escape(test.summary())}[/]")


def render_benchmark(result: dict[str, Any], console: Any) -> None:
    """One row per format x precision: status, size, accuracy, macro-F1, agreement, latency, speed."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(result['model'])}[/] on [bold]{escape(result['dataset'])}[/] "
                  f"[dim]({result.get('sampling') or str(result['num_samples']) + ' images'}, "
                  f"{result['device']}, batch sizes {', '.join(map(str, result['batch_sizes']))})[/]")
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
            pct(row.get("accuracy")), num(row.get("macro_f1"), ".4f"), pct(row.get("agreement")),
            num(row.get("latency_ms_p50"), ".2f"), num(row.get("latency_ms_p99"), ".2f"),
            num(row.get("throughput"), ",.0f"), num(row.get("best_batch_size"), "d"),
            "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
            p_value(row.get("mcnemar_p")),
        )
    if not console.is_terminal and console.width < 150:  # logs and pipes: do not squeeze 12 columns into 80
        console.width = 150
    console.print(table)
    console.print("[dim]p vs fp32: McNemar's exact test of each row's right/wrong answers against torch "
                  "eager fp32; below 0.05 (*) the accuracy difference is more than noise[/]")
    if result.get("recommendation"):
        console.print(f"[bold]{escape(result['recommendation'])}[/]")
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]{escape(row['name'])}[/]: {escape(row['error'])}")
    for path in result.get("files", []):
        console.print(f"wrote {escape(path)}")
