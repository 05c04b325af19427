"""`toolkit benchmark`: every row made here runs, agrees with PyTorch, and a failing row does not stop
the rest."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.errors import UsageError

pytestmark = pytest.mark.slow


def test_plan_always_starts_with_torch_and_rejects_unknown_names():
    from export.benchmark import plan

    rows = plan(["onnx"], ["int8"])
    assert [(v.format, v.precision) for v in rows] == [("torch", "fp32"), ("onnx", "int8")]
    with pytest.raises(UsageError, match="unknown format"):
        plan(["caffe"], None)
    with pytest.raises(UsageError, match="unknown precision"):
        plan(None, ["int4"])


def test_plan_runs_the_torch_rows_at_the_run_precision():
    """Issue 12: --precision is the compute precision of the torch and TorchScript rows (--formats chooses
    them; --precisions still chooses the exported files), after the torch fp32 reference."""
    from export.benchmark import plan

    def names(*args):
        return [f"{v.format} {v.precision}" for v in plan(*args)]

    assert names(None, None, "bf16")[:4] == ["torch fp32", "torch bf16", "torchscript bf16", "onnx fp32"]
    assert names(["torch", "onnx"], ["int8"], "fp16") == ["torch fp32", "torch fp16", "onnx int8"]
    assert names(["torchscript"], None, "fp32") == ["torch fp32", "torchscript fp32"]
    assert names(["torch"], None, "fp32") == ["torch fp32"]  # the reference itself: no second row
    with pytest.raises(UsageError, match="add one of them to --formats"):
        plan(["onnx"], None, "bf16")
    with pytest.raises(UsageError, match="for --precision"):
        plan(None, None, "int8")


def test_benchmark_precision_runs_torch_and_torchscript_rows_at_bf16(sample_model, monkeypatch):
    import toolkit.runtime.registry as registry

    opened = []
    real_open = registry.open_model

    def spy(model, backend="auto", device="cpu", **options):
        runner = real_open(model, backend=backend, device=device, **options)
        opened.append((backend, options.get("precision"), runner.precision))
        return runner

    monkeypatch.setattr(registry, "open_model", spy)
    result = CliRunner().invoke(app, ["benchmark", "-m", str(sample_model), "--dataset", "sample",
                                      "--formats", "torch,torchscript", "--precision", "bf16",
                                      "--limit", "64", "--batch-sizes", "16", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
    assert list(rows) == ["torch fp32", "torch bf16", "torchscript bf16"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["agreement"] >= 0.9 and row["accuracy"] > 0.9 and row["throughput"] > 0
    assert rows["torch fp32"]["speedup"] == 1.0 and rows["torch bf16"]["mcnemar_p"] is not None
    # the fp32 reference (and the timing images) open at fp32; the rows at bf16, as the runners report
    assert ("torch", "bf16", "bf16") in opened and ("torchscript", "bf16", "bf16") in opened
    assert all(got == "fp32" for backend, asked, got in opened if asked is None)


def test_benchmark_rows_json_and_chart(sample_model, tmp_path, monkeypatch):
    import export.benchmark as bench

    real_open = bench._open

    def broken_fp16(variant, *args, **kwargs):  # one row breaks: it must report, the others still run
        if variant.precision == "fp16":
            raise RuntimeError("simulated fp16 failure")
        return real_open(variant, *args, **kwargs)

    monkeypatch.setattr(bench, "_open", broken_fp16)
    result = bench.run_benchmark(sample_model, formats=["torch", "onnx", "openvino", "tensorrt"],
                                 precisions=["fp32", "fp16", "int8"], limit=64, batch_sizes=[8, 32],
                                 output_dir=tmp_path, latency_runs=5, min_seconds=0.05, calib_size=64,
                                 verify_samples=64)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["torch fp32", "onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8",
                          "openvino fp32", "openvino int8", "tensorrt int8"]
    assert rows["onnxruntime fp16"]["status"] == "failed" and "simulated" in rows["onnxruntime fp16"]["error"]
    assert rows["tensorrt int8"]["status"] == "skipped" and "cuda" in rows["tensorrt int8"]["error"]
    for name in ("torch fp32", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"):
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        assert row["accuracy"] > 0.9 and row["agreement"] >= 0.95 and row["macro_f1"] > 0.9
        assert row["throughput"] > 0 and row["best_batch_size"] in (8, 32)
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
        assert row["size_bytes"] > 0
    assert rows["torch fp32"]["speedup"] == 1.0
    assert rows["onnxruntime int8"]["size_bytes"] < rows["onnxruntime fp32"]["size_bytes"]
    assert rows["onnxruntime fp32"]["max_abs_diff"] < 1e-3
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "resnet20_digits.int8.onnx").is_file()


@pytest.mark.slow
def test_benchmark_card_flags_reach_every_row_and_limit_is_balanced(sample_model, tmp_path):
    """The torch reference, the timing images and every export open the checkpoint with the same card
    flags: with an odd normalisation all rows still answer alike, and the artifact carries it."""
    import export.benchmark as bench
    from toolkit.card_layers import CardFlags
    from toolkit.runtime.registry import read_artifact

    flags = CardFlags.parse(mean="0.2,0.2,0.2", std="0.5,0.5,0.5")
    result = bench.run_benchmark(sample_model, formats=["torch", "onnx"], precisions=["fp32"], limit=40,
                                 batch_sizes=[16], output_dir=tmp_path, latency_runs=3, min_seconds=0.05,
                                 verify_samples=32, card_flags=flags)
    assert result["sampling"] == "40 of 360 images, class-balanced (seed 0)" and result["num_samples"] == 40
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["onnxruntime fp32"]["status"] == "ok" and rows["onnxruntime fp32"]["agreement"] == 1.0
    card, _ = read_artifact(tmp_path / "resnet20_digits.onnx")
    assert card.mean == (0.2, 0.2, 0.2) and card.std == (0.5, 0.5, 0.5)


def test_benchmark_cli_table(sample_model):
    result = CliRunner().invoke(app, ["benchmark", "-m", str(sample_model), "--dataset", "sample",
                                      "--formats", "torch,torchscript", "--limit", "32",
                                      "--batch-sizes", "8"])
    assert result.exit_code == 0, result.output
    assert "torchscript fp32" in result.output and "speed-up" in result.output
    torch_row = result.output.split("torch fp32")[1].splitlines()[0]
    assert " ok " in torch_row and "1.00x" in torch_row


# --- torch.export and AOTInductor rows (issue 21) ------------------------------------------------------

def test_plan_offers_the_torch_export_and_aoti_rows():
    from export.benchmark import plan

    assert [v.label for v in plan(["pt2", "aoti"], None)] == ["torch fp32", "pt2 fp32", "aoti fp32"]


def _row(name: str, throughput: float, *, status: str = "ok", accuracy: float = 0.9,
         mcnemar_p: float | None = 1.0) -> dict:
    backend = name.split()[0]
    return {"name": name, "backend": backend, "status": status, "throughput": throughput,
            "best_batch_size": 32, "speedup": throughput / 100, "accuracy": accuracy, "mcnemar_p": mcnemar_p}


def test_recommendation_names_the_fastest_row_without_a_significant_accuracy_loss():
    from export.benchmark import recommendation

    rows = [_row("torch fp32", 100, mcnemar_p=None),
            _row("onnxruntime int8", 900, accuracy=0.7, mcnemar_p=0.001),  # faster, but significantly worse
            _row("tensorrt fp16", 5000, status="skipped"), _row("aoti fp32", 250), _row("pt2 fp32", 110)]
    line = recommendation(rows, "cpu")
    assert line is not None and line.startswith("fastest CPU path here: aoti fp32 (AOTInductor package)")
    assert "250 img/s at batch 32, 2.50x torch eager fp32" in line
    # significantly MORE accurate is no reason to skip a row
    rows[1]["accuracy"] = 0.95
    assert "onnxruntime int8 (ONNX Runtime)" in (recommendation(rows, "cpu") or "")
    assert recommendation([], "cpu") is None


def test_benchmark_runs_the_torch_export_and_aoti_rows(sample_model):
    result = CliRunner().invoke(app, ["benchmark", "-m", str(sample_model), "--dataset", "sample",
                                      "--formats", "torch,pt2,aoti", "--limit", "64", "--batch-sizes", "16"])
    assert result.exit_code == 0, result.output
    for name in ("pt2 fp32", "aoti fp32"):
        row = result.output.split(name)[1].splitlines()[0]
        assert " ok " in row and "100.00 %" in row, result.output  # agreement with torch eager
    assert "fastest CPU path here: " in result.output

