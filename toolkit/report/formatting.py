"""Numbers for people (full precision stays in the JSON): one spelling for the terminal and the page."""

from __future__ import annotations

from typing import Any


def pct(value: float | None, digits: int = 2) -> str:
    """0.99721 -> '99.72 %'; None -> '-'."""
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def rate(value: float | None) -> str:
    """3376.5968 -> '3,377 img/s'."""
    return "-" if value is None else f"{value:,.0f} img/s"


def number(value: Any) -> str:
    """Integers with thousands separators, other floats to 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


METRIC_LABELS = {"accuracy": "accuracy", "top5": "top-5", "macro_f1": "macro F1",
                 "weighted_f1": "weighted F1", "ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier",
                 "images_per_second": "speed"}
_PERCENT_METRICS = {"accuracy", "top5", "ece", "mce"}


def metric(key: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed and value > 0 else ""
    if key in _PERCENT_METRICS:
        return f"{sign}{100 * value:.2f} pp" if signed else pct(value)
    if key == "images_per_second":
        return f"{sign}{value:,.0f} img/s"
    return f"{sign}{value:.4f}"


def p_value(p: float | None) -> str:
    """McNemar p-value for a table cell, starred below 0.05."""
    from ..compare import ALPHA, format_p

    return "-" if p is None else format_p(p) + (" *" if p < ALPHA else "")

