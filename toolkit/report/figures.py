"""PNG figures for the report folder (and export/benchmark.py's): pyplot on Agg, imported only when drawn.

matplotlib is optional (the `plots` extra): `pyplot()` is None without it, and callers skip their
figures with one notice instead of failing the report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formatting import pct


def pyplot() -> Any | None:
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

    from ..fileio import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path | None:
    """Row-normalised confusion matrix (recall on the diagonal) with counts where they fit."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
        top.set_title(f"reliability diagram — ECE {pct(calibration['ece'])}, MCE {pct(calibration['mce'])}")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(lower, counts, width=width, align="edge", color="#7f7f7f", edgecolor="white")
        for x, w, c in zip(lower[filled], width[filled], counts[filled]):
            bottom.text(x + w / 2, c, f"{c:,}", ha="center", va="bottom", fontsize=7)
        bottom.set_ylim(0, max(1, counts.max()) * 1.3)
        bottom.set_ylabel("images")
        bottom.set_xlabel("confidence (top-1 probability)")
        bottom.set_xlim(0, 1)
        return save_figure(fig, path)

