"""The eval report for people: figures formatted for reading, calibration and errors in every output,
the error gallery, literal class names in plots, and an output folder written whole or not at all."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from support.cli import invoke
from toolkit.card import ModelCard
from toolkit.data import Dataset
from toolkit.errors import NoSpaceError, UsageError
from toolkit.evaluate import EvalReport, evaluate
from toolkit.report import EVAL_FILES, GALLERY_LIMIT, render_eval, write_eval_outputs
from toolkit.runtime.base import Runner

MATHTEXT_NAMES = ("$\\foo{$", "a$b$c", "50% $x^2$", "plain", "back\\slash", "_under_", "{brace}", "$", "^hat",
                  "%percent")


class LinearRunner(Runner):
    """A fixed random linear map of the pixels: a model that is wrong often, with spread-out confidences."""

    backend = "linear"

    def __init__(self, card: ModelCard, *, seed: int = 0, scale: float = 40.0,
                 source: str = "linear") -> None:
        super().__init__(card, source=source)
        rng = np.random.default_rng(seed)
        self.weights = rng.normal(size=(int(np.prod(card.input_size)), card.num_classes)).astype(np.float32)
        self.scale = scale

    @classmethod
    def open(cls, path: object, *, device: str = "cpu") -> Runner:  # pragma: no cover - built directly
        raise NotImplementedError("LinearRunner is built from a card, not opened from a file")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(len(batch), -1)
        return (flat @ self.weights) / (self.scale * np.sqrt(flat.shape[1]) / 10)


def dataset(names: tuple[str, ...] = MATHTEXT_NAMES, n: int = 200, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return Dataset("noise", names, rng.integers(0, len(names), n), images=images)


def make_report(names: tuple[str, ...] = MATHTEXT_NAMES, n: int = 200, seed: int = 0) -> EvalReport:
    card = ModelCard(arch="resnet20", class_names=names, input_size=(3, 8, 8), resize_size=8)
    return evaluate(LinearRunner(card, seed=seed), dataset(names, n), batch_size=64)


@pytest.fixture(scope="module")
def report() -> EvalReport:
    return make_report()


@pytest.mark.slow
def test_numbers_are_formatted_for_people_and_exact_in_json(tmp_path):
    from rich.console import Console

    report = make_report()
    report.timing.total_images, report.timing.total_seconds = 33765968, 10_000.0  # 3376.5968 img/s
    report.timing.warmup_images = report.timing.warmup_seconds = 0
    report.timing.model_seconds = 5_000.0
    console = Console(record=True, width=200)
    render_eval(report, console)
    text = console.export_text()
    assert "3,377 img/s end-to-end" in text and "6,753 img/s model-only" in text
    assert f"accuracy {100 * report.accuracy:.2f} %" in text and "calibration ECE" in text
    write_eval_outputs(report, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "3,377 img/s" in page and "3376.5968" not in page
    assert f"{100 * report.accuracy:.2f} %" in page
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images_per_second"] == pytest.approx(3376.5968, abs=1e-9)


@pytest.mark.slow
def test_calibration_and_errors_in_every_output(report, tmp_path):
    data = report.to_dict()
    calibration = data["calibration"]
    assert calibration["ece"] == pytest.approx(report.calibration.ece) and calibration["nll"] > 0
    wrong = int((report.predictions != report.labels).sum())
    assert data["errors"]["misclassified"] == wrong > GALLERY_LIMIT
    top = data["errors"]["top_confusions"][0]
    mask = (report.labels == report.class_names.index(top["true"])) & (
        report.predictions == report.class_names.index(top["predicted"]))
    assert top["count"] == mask.sum() and top["share"] == pytest.approx(mask.sum() / wrong)

    written = write_eval_outputs(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EVAL_FILES.values())
    assert set(written) == set(EVAL_FILES)
    written_calibration = json.loads((tmp_path / "metrics.json").read_text())["calibration"]
    assert written_calibration == json.loads(json.dumps(calibration))
    rows = (tmp_path / "errors.csv").read_text().splitlines()
    assert rows[0] == "rank,index,input,label,predicted,confidence,true_class_probability"
    assert len(rows) == wrong + 1
    confidences = [float(r.rsplit(",", 2)[1]) for r in rows[1:]]
    assert confidences == sorted(confidences, reverse=True)
    first = rows[1].split(",")
    assert report.predictions[int(first[1])] != report.labels[int(first[1])]

    page = (tmp_path / "report.html").read_text()
    # Three plots plus the gallery, capped: the most confident mistakes only; the page stays small.
    assert page.count('class="thumb"') == GALLERY_LIMIT
    assert page.count("data:image/png;base64,") == 3 + GALLERY_LIMIT
    assert "reliability diagram" in page and "Most confident mistakes" in page and 'src="http' not in page
    assert len(page) < 1_000_000


@pytest.mark.slow
def test_mathtext_class_names_are_drawn_literally(report, tmp_path):
    """Names that matplotlib would parse as TeX (`$\\foo{$`) once crashed after 3 of 6 files."""
    write_eval_outputs(report, tmp_path)
    for name in ("confusion_matrix.png", "per_class_f1.png", "reliability_diagram.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "$\\foo{$" in page  # html-escaped text keeps $ and backslash as they are


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_failure_midway_leaves_the_previous_report_whole(report, tmp_path, monkeypatch):
    import toolkit.report.files as module  # where the writers look them up

    out = tmp_path / "out"
    write_eval_outputs(make_report(seed=1), out)
    before = _snapshot(out)

    def broken(*args, **kwargs):
        raise RuntimeError("plotting died")

    monkeypatch.setattr(module, "plot_per_class_f1", broken)
    with pytest.raises(RuntimeError, match="plotting died"):
        write_eval_outputs(report, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it


@pytest.mark.slow
@pytest.mark.parametrize("where", ["csv_text", "eval_html"])
def test_full_disk_is_one_line_and_nothing_partial(report, tmp_path, monkeypatch, where):
    import toolkit.report.files as module  # where the writers look them up

    out = tmp_path / "out"
    write_eval_outputs(make_report(seed=2), out)
    before = _snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, where, full)
    with pytest.raises(NoSpaceError) as caught:
        write_eval_outputs(report, out)
    assert str(caught.value) == f"no space left on {out}"
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # And a first report on a full disk leaves nothing at all.
    with pytest.raises(NoSpaceError):
        write_eval_outputs(report, tmp_path / "new")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_cli_full_disk_is_one_red_line(sample_model, tmp_path, monkeypatch):
    import toolkit.report.files as module  # where the writers look them up

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "eval_html", full)
    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--limit", "20", "--output-dir",
                    tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"error: no space left on {tmp_path / 'out'}"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_other_files_is_not_replaced(report, tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(UsageError, match="not part of a report"):
        write_eval_outputs(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and keep.read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        write_eval_outputs(report, tmp_path / "file")


def test_thumbnails_of_files_and_unreadable_ones(tmp_path):
    from PIL import Image

    from toolkit.report import gallery_html, thumbnail_png

    Image.new("RGB", (300, 200), (200, 10, 10)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "tiny.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = Dataset("files", ("a",), np.zeros(3, np.int64), paths=[tmp_path / n for n in
                                                                  ("big.png", "tiny.png", "broken.png")])
    import io

    sizes = [Image.open(io.BytesIO(thumbnail_png(data, i))).size for i in (0, 1)]
    assert sizes == [(96, 64), (96, 96)]  # large ones shrink, tiny ones grow by whole pixels
    assert thumbnail_png(data, 2) is None
    page = gallery_html(data, [(2, "broken.png", [("<b>", "wrong")])])
    assert "no preview" in page and "&lt;b&gt;" in page


def test_the_report_package_imports_nothing_heavy_and_keeps_its_names():
    """Split by medium (issue 20), `from toolkit.report import X` still works for every name the CLI, the
    benchmark and the tests use, and importing it loads none of rich, matplotlib, PIL or torch."""
    import subprocess
    import sys

    names = ("render_validation render_info render_eval render_predictions render_compare render_benchmark "
             "progress_bar predictions_csv write_eval_outputs write_compare_outputs EVAL_FILES GALLERY_LIMIT "
             "gallery_html thumbnail_png save_figure pyplot")
    code = (f"import sys\nfrom toolkit.report import {', '.join(names.split())}\n"
            "heavy = [m for m in ('rich', 'matplotlib', 'PIL', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmark_table_shows_the_mcnemar_p_value():
    from rich.console import Console

    from toolkit.report import render_benchmark

    def row(name: str, p: float | None) -> dict:
        return {"name": name, "status": "ok", "accuracy": 0.99, "macro_f1": 0.99, "agreement": 1.0,
                "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "throughput": 1000.0, "best_batch_size": 32,
                "speedup": 1.0, "size_bytes": 1_000_000, "mcnemar_p": p, "error": None}

    result = {"model": "m.pt", "dataset": "sample-test", "num_samples": 360, "device": "cpu",
              "batch_sizes": [32],
              "rows": [row("torch fp32", None), row("onnxruntime int8", 0.0123), row("openvino int8", 1.0)]}
    console = Console(record=True, width=200)
    render_benchmark(result, console)
    text = console.export_text()
    assert "p vs fp32" in text and "0.0123 *" in text and "1.0000" in text and "McNemar" in text
