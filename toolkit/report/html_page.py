"""The self-contained HTML pages of eval and compare: tables, embedded PNGs and a thumbnail gallery.

Everything is inline (styles, base64 images), so a page can be mailed or archived as one file;
every piece of user text goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .formatting import METRIC_LABELS, metric, number, pct, rate

if TYPE_CHECKING:  # pragma: no cover
    from ..compare import Comparison
    from ..data import Dataset

GALLERY_LIMIT = 64  # thumbnails in a report page: enough to see a pattern, small enough to open fast
THUMBNAIL_SIZE = 96


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

    from ..errors import ToolkitError
    from ..images import decode_image

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
    f = number
    summary = [("model", data["model"]), ("backend", data["backend"]), ("device", data["device"]),
               ("precision", data["precision"]), ("dataset", data["dataset"]),
               ("images", f(data["num_samples"])), ("accuracy", pct(data["accuracy"])),
               ("top-5", pct(data["top5"])), ("speed, end-to-end", rate(data["images_per_second"])),
               ("speed, model only", rate(data["model_images_per_second"])),
               ("batch size", f(data["batch_size"]))]
    averages = [(kind, f(data[kind]["precision"]), f(data[kind]["recall"]), f(data[kind]["f1"]))
                for kind in ("macro", "micro", "weighted")]
    cal = data["calibration"]
    calibration = [("expected calibration error (ECE)", pct(cal["ece"])),
                   ("maximum calibration error (MCE)", pct(cal["mce"])),
                   ("negative log-likelihood (NLL)", f(cal["nll"])), ("Brier score", f(cal["brier"]))]
    confusions = [(c["true"], c["predicted"], f(c["count"]), pct(c["share"]), pct(c["true_class_rate"]))
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


def compare_html(comparison: Comparison, gallery: str, gallery_note: str) -> str:
    from ..compare import format_p

    data = comparison.to_dict()
    test = comparison.test
    models = [("A", data["a"]["model"], data["a"]["backend"], data["a"]["precision"]),
              ("B", data["b"]["model"], data["b"]["backend"], data["b"]["precision"])]
    metrics = [(METRIC_LABELS[r["metric"]], metric(r["metric"], r["a"]), metric(r["metric"], r["b"]),
                metric(r["metric"], r["delta"], signed=True)) for r in data["metrics"]]
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
        f"<p>Top-1 agreement {pct(data['agreement'])} on {data['num_samples']:,} images.</p>"
        f"<h2>Side by side</h2>{_html_table(['metric', 'A', 'B', 'B - A'], metrics)}"
        f"<h2>Where they disagree</h2><p class='muted'>{html.escape(gallery_note)}</p>{gallery}"
        f"<h2>Per class</h2>"
        f"{_html_table(class_header, per_class)}"
    ))
