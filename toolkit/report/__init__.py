"""Render reports for people, one module per medium.

- `terminal`: rich tables and lines, the progress bar;
- `files`: the report folders (JSON, CSV) swapped in whole, and predict's CSV;
- `figures`: PNG plots (matplotlib, optional, imported only when a plot is drawn, on Agg);
- `html_page`: the self-contained HTML pages and their thumbnail gallery;
- `formatting`: how numbers are spelled for people (full precision stays in the JSON).

JSON is each report's own `to_dict`. Importing this package imports none of rich, matplotlib or PIL,
so the CLI's start-up and `toolkit predict` stay light. The names below are the public surface.
"""

from __future__ import annotations

from .figures import plot_confusion_matrix, plot_per_class_f1, plot_reliability, pyplot, save_figure
from .files import (
    COMPARE_FILES,
    EVAL_FILES,
    check_output_dir,
    error_rows,
    predictions_csv,
    report_folder,
    write_compare_outputs,
    write_eval_outputs,
)
from .html_page import GALLERY_LIMIT, THUMBNAIL_SIZE, compare_html, eval_html, gallery_html, thumbnail_png
from .terminal import (
    calibration_line,
    card_rows,
    progress_bar,
    render_benchmark,
    render_compare,
    render_eval,
    render_info,
    render_predictions,
    render_validation,
    speed_line,
)

_matplotlib = pyplot  # the name export/benchmark.py imports; `pyplot` is the public one

__all__ = [
    "COMPARE_FILES", "EVAL_FILES", "GALLERY_LIMIT", "THUMBNAIL_SIZE", "calibration_line", "card_rows",
    "check_output_dir", "compare_html", "error_rows", "eval_html", "gallery_html", "plot_confusion_matrix",
    "plot_per_class_f1", "plot_reliability", "predictions_csv", "progress_bar", "pyplot", "render_benchmark",
    "render_compare", "render_eval", "render_info", "render_predictions", "render_validation",
    "report_folder", "save_figure", "speed_line", "thumbnail_png", "write_compare_outputs",
    "write_eval_outputs",
]
