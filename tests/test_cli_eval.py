"""The eval and predict commands: JSON contract, output files, exit codes, globs and stdin."""

from __future__ import annotations

import contextlib
import json

import pytest
from PIL import Image

from support.cli import invoke

KEYS = {"accuracy", "top5", "macro", "micro", "weighted", "per_class", "confusion_matrix", "num_samples",
        "images_per_second", "backend", "model"}
OUTPUT_FILES = ("predictions.csv", "confusion_matrix.csv", "confusion_matrix.png", "per_class_f1.png",
                "report.html")


@pytest.mark.slow
def test_eval_json_and_output_dir_on_onnx(sample_onnx_fp32, tmp_path):
    result = invoke("eval", "-m", sample_onnx_fp32, "--dataset", "sample", "--limit", 40, "--batch-size", 16,
                    "--output-dir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= KEYS and data["num_samples"] == 40 and data["backend"] == "onnxruntime"
    assert {r["class"] for r in data["per_class"]} == {str(i) for i in range(10)}
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == data["accuracy"]
    for name in OUTPUT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.slow
def test_eval_table_on_checkpoint(sample_model):
    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--limit", 30)
    assert result.exit_code == 0, result.output
    assert "macro avg" in result.output and "weighted avg" in result.output and "img/s" in result.output


@pytest.mark.slow
def test_eval_progress_bar_belongs_to_the_cli(sample_model, monkeypatch):
    """The CLI draws the bar (on a terminal) from evaluate()'s progress callback: every image counted once."""
    import toolkit.report

    seen: list[tuple[int, str, bool | None]] = []
    advanced: list[int] = []

    @contextlib.contextmanager
    def recording(total: int, description: str, enabled: bool | None = None):
        seen.append((total, description, enabled))
        yield None if enabled is False else advanced.append

    monkeypatch.setattr(toolkit.report, "progress_bar", recording)
    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--limit", 30, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert seen == [(30, "eval torch", None)] and advanced == [8, 8, 8, 6]
    seen.clear()
    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--limit", 30, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["num_samples"] == 30
    assert seen == [(30, "eval torch", False)]  # --json: stdout is for machines, no bar


def test_eval_errors(sample_model, tmp_path):
    result = invoke("eval", "-m", sample_model)
    assert result.exit_code == 2 and "--dataset is required" in result.output
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / name / "x.png")
    result = invoke("eval", "-m", sample_model, "--dataset", "folder", "--data-dir", tmp_path)
    assert result.exit_code == 1 and "'cat'" in result.output and "'0'" in result.output
    result = invoke("eval", "-m", sample_model, "--dataset", "cifar10", "--data-dir", tmp_path)
    assert result.exit_code == 1 and "cifar10 not found" in result.output
    result = invoke("eval", "-m", sample_model, "--dataset", "sample", "--backend", "onnxruntime")
    assert result.exit_code == 2 and "cannot run" in result.output


@pytest.fixture
def images(tmp_path, sample_test):
    (tmp_path / "nested").mkdir()
    for i, name in enumerate(("a.png", "b.jpg", "nested/c.bmp")):
        Image.fromarray(sample_test.images[i]).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


def test_predict_formats_globs_and_exit_codes(sample_onnx_fp32, images):
    model = sample_onnx_fp32
    result = invoke("predict", "-m", model, images / "*.png", images / "nested", "-f", "json", "-k", 2)
    assert result.exit_code == 1  # broken.png matched the glob
    out = json.loads(result.stdout)
    assert [o["input"].split("/")[-1] for o in out] == ["a.png", "broken.png", "c.bmp"]
    assert len(out[0]["top"]) == 2 and "error" in out[1] and set(out[2]) == {"input", "top"}
    assert "1 of 3 inputs could not be read" in result.stderr

    result = invoke("predict", "-m", model, images / "a.png", images / "b.jpg", "-f", "csv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "input,rank,class,index,probability,error" and len(lines) == 1 + 2 * 5

    paths = f"{images / 'a.png'}\n{images / 'missing.png'}\n"
    result = invoke("predict", "-m", model, "-", "-f", "json", input=paths)
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert "top" in out[0] and "missing.png" in out[1]["error"]

    result = invoke("predict", "-m", model, images / "nothing-*.png", "-f", "json")
    assert result.exit_code == 1 and "no files match" in json.loads(result.stdout)[0]["error"]

    result = invoke("predict", "-m", model, images / "a.png")
    assert result.exit_code == 0 and "a.png" in result.output and "prediction" in result.output
