"""Render reports for people: rich terminal tables (JSON is the reports' own `to_dict`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .validate import ValidationReport

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow"}


def render_validation(report: ValidationReport, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    verdict = "[bold green]VALID[/]" if report.valid else "[bold red]INVALID[/]"
    console.print(f"{verdict}  {escape(report.path)}")
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="dim")
    facts.add_column()
    rows: list[tuple[str, Any]] = [
        ("architecture", report.arch),
        ("family / stem", f"{report.family} / {report.stem}"),
        ("depth", report.depth),
        ("shortcut", report.shortcut),
        ("classes", report.num_classes),
        ("parameters", f"{report.parameters / 1e6:.2f}M" if report.parameters else None),
        ("stored as", ", ".join(filter(None, [
            f"under '{report.wrapper}'" if report.wrapper else "plain state_dict",
            f"prefix '{report.prefix}' stripped" if report.prefix else "",
            f"{report.layout} key layout" if report.layout else "",
        ]))),
        ("sha256", report.sha256[:16] + "…" if report.sha256 else None),
    ]
    if report.card is not None:
        names = report.card.class_names
        rows.append(("class names", ", ".join(names[:10]) + (" …" if len(names) > 10 else "")))
        rows.append(("input", f"{report.card.input_size}, mean {report.card.mean}, std {report.card.std}"))
    if report.accuracy is not None:
        rows.append(("accuracy", f"{report.accuracy:.4f} top-1 on {report.accuracy_samples} images"))
    for label, value in rows:
        if value not in (None, ""):
            facts.add_row(label, escape(str(value)))
    console.print(facts)
    if not report.problems:
        console.print("[green]no problems found[/]")
    for problem in report.problems:
        style = SEVERITY_STYLE[problem.severity]
        console.print(f"[{style}]{problem.severity}[/] [dim]{problem.code}[/]: {escape(problem.message)}")
