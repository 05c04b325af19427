"""Shard bookkeeping and input plumbing of the engines, without starting Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolkit.engines import ENGINES, get_engine
from toolkit.engines.shards import (
    EVAL_COLUMNS,
    PREDICT_COLUMNS,
    SHARD_DIR,
    ShardStore,
    calibration_from_summary,
    calibration_summary,
    cm_from_summary,
    cm_summary,
    predict_columns,
    predict_results,
)
from toolkit.engines.sources import as_url
from toolkit.errors import ToolkitError, UsageError
from toolkit.metrics import Calibration, ConfusionMatrix

JOB = {"kind": "eval", "model": "m.onnx", "rows": 5}


def eval_columns(start: int, stop: int) -> dict[str, list]:
    n = stop - start
    return {"index": list(range(start, stop)), "input": [f"img{i}.png" for i in range(start, stop)],
            "label": ["a"] * n, "predicted": ["b"] * n, "confidence": [0.25] * n,
            "true_probability": [float("nan")] * n, "error": [""] * n}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_shards_round_trip_and_a_rerun_skips_finished_ones(tmp_path, fmt):
    pytest.importorskip("pyarrow")
    store = ShardStore(tmp_path, JOB, 5, EVAL_COLUMNS, shard_size=2, fmt=fmt)
    assert store.pending() == [0, 1, 2] and store.bounds(2) == (4, 5)
    store.write(0, eval_columns(0, 2), {"errors": 0})
    store.write(2, eval_columns(4, 5), {"errors": 0})
    (tmp_path / SHARD_DIR / ".part-00001.parquet.dead.parquet").write_bytes(b"half")  # a killed writer's temp

    again = ShardStore(tmp_path, JOB, 5, EVAL_COLUMNS, shard_size=2, fmt=fmt)
    assert again.rows_done() == 3  # shards 0 (2 rows) and 2 (1 row): where a resumed run's progress starts
    assert again.pending() == [1]
    assert not list((tmp_path / SHARD_DIR).glob(".part-*"))
    again.write(1, eval_columns(2, 4), {"errors": 0})
    again.finish()
    rows = again.read()
    assert rows["index"] == [0, 1, 2, 3, 4] and rows["input"][3] == "img3.png"
    assert rows["confidence"] == [0.25] * 5 and all(np.isnan(rows["true_probability"]))
    assert json.loads((tmp_path / SHARD_DIR / "manifest.json").read_text())["complete"] is True
    with pytest.raises(ValueError, match="expected 1"):
        again.write(2, eval_columns(0, 2), {})


def test_a_folder_of_another_job_is_refused_not_mixed(tmp_path):
    ShardStore(tmp_path, JOB, 5, EVAL_COLUMNS, shard_size=2, fmt="csv")
    with pytest.raises(UsageError, match="different run"):
        ShardStore(tmp_path, {**JOB, "model": "other.onnx"}, 5, EVAL_COLUMNS, shard_size=2, fmt="csv")
    with pytest.raises(UsageError, match="different run"):
        ShardStore(tmp_path, JOB, 5, EVAL_COLUMNS, shard_size=3, fmt="csv")
    (tmp_path / "x" / SHARD_DIR).mkdir(parents=True)
    (tmp_path / "x" / SHARD_DIR / "part-00000.csv").write_text("index\n0\n")
    with pytest.raises(UsageError, match=r"no manifest\.json"):
        ShardStore(tmp_path / "x", JOB, 5, EVAL_COLUMNS, fmt="csv")


@pytest.mark.slow
def test_shards_survive_a_report_that_replaces_its_folder_whole(tmp_path, monkeypatch, sample_test,
                                                                sample_card):
    """`eval --output-dir` swaps the report folder in whole; Ray's predictions/ shards carry over, and a
    swap that fails leaves the old folder, shards included, byte for byte."""
    import toolkit.fileio
    from fakes.runners import ConstantRunner
    from toolkit.evaluate import evaluate
    from toolkit.report import write_eval_outputs

    out = tmp_path / "report"
    store = ShardStore(out, JOB, 1, EVAL_COLUMNS, shard_size=1, fmt="csv")
    store.write(0, eval_columns(0, 1), {"errors": 0})
    before = {p.name: p.read_bytes() for p in (out / SHARD_DIR).iterdir()}
    data = sample_test.subset(20)
    report = evaluate(ConstantRunner(sample_card, source="const"), data, batch_size=8)

    write_eval_outputs(report, out, keep=(SHARD_DIR,))
    assert (out / "metrics.json").is_file()
    assert {p.name: p.read_bytes() for p in (out / SHARD_DIR).iterdir()} == before
    assert ShardStore(out, JOB, 1, EVAL_COLUMNS, shard_size=1, fmt="csv").pending() == []

    def broken_swap(staging, destination, **_):
        raise OSError("simulated failure at the swap")

    monkeypatch.setattr(toolkit.fileio, "swap_in", broken_swap)
    old_metrics = (out / "metrics.json").read_bytes()
    with pytest.raises(ToolkitError, match="simulated failure at the swap"):  # one line, not a traceback
        write_eval_outputs(report, out, keep=(SHARD_DIR,))
    assert {p.name: p.read_bytes() for p in (out / SHARD_DIR).iterdir()} == before
    assert (out / "metrics.json").read_bytes() == old_metrics
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_merged_shard_summaries_equal_one_pass():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 300)
    whole_cm = ConfusionMatrix(7).add_scores(labels, logits)
    whole_cal = Calibration().add_logits(labels, logits)
    cm, cal = ConfusionMatrix(7), Calibration()
    for part in np.array_split(np.arange(300), 7):
        shard_cm = ConfusionMatrix(7).add_scores(labels[part], logits[part])
        shard_cal = Calibration().add_logits(labels[part], logits[part])
        cm = cm.merge(cm_from_summary(json.loads(json.dumps(cm_summary(shard_cm))), 7))
        cal = cal.merge(calibration_from_summary(json.loads(json.dumps(calibration_summary(shard_cal)))))
    assert cm == whole_cm and cm.top5 == whole_cm.top5
    assert cal == whole_cal and cal.nll == pytest.approx(whole_cal.nll, rel=1e-12)


def test_predict_answers_round_trip_through_columns():
    answers = [{"input": "a.png", "top": [{"class": "cat", "index": 3, "probability": 0.75},
                                          {"class": "dog", "index": 5, "probability": 0.125}]},
               {"input": "b.png", "error": "b.png: not a recognised image file"}]
    columns = predict_columns(answers, 10)
    assert columns["index"] == [10, 11] and set(columns) == set(PREDICT_COLUMNS)
    assert predict_results(columns) == answers


@pytest.mark.parametrize(("given", "url"), [
    ("s3://bucket/key", "s3://bucket/key"),
    (Path("s3://bucket/key"), "s3://bucket/key"),  # Path folds // into /
    (Path("memory://folder/x"), "memory://folder/x"),
    (Path("file:///tmp/images"), "file:///tmp/images"),
    ("images/cats", None),
    ("/abs/path", None),
    ("C:/data", None),
    (None, None),
])
def test_urls_are_recognised_and_unfolded(given, url):
    assert as_url(given) == url


def test_engine_registry_and_local_engine_options(sample_onnx_fp32, tmp_path):
    assert ENGINES == ("local", "ray")
    with pytest.raises(UsageError, match="unknown engine"):
        get_engine("spark")
    local = get_engine("local")
    from toolkit.engines import RunnerSpec

    spec = RunnerSpec(str(sample_onnx_fp32))
    images = sorted((Path(__file__).parents[1] / "toolkit" / "sample" / "images").glob("*"))[:3]
    with pytest.raises(UsageError, match="--address, --replicas only apply to --engine ray"):
        local.predict(spec, local.gather([str(p) for p in images]), address="auto", replicas=2)
    results = local.predict(spec, local.gather([str(p) for p in images]), top_k=2,
                            output_dir=tmp_path)
    store = ShardStore(tmp_path, json.loads((tmp_path / SHARD_DIR / "manifest.json").read_text())["job"],
                       len(results), PREDICT_COLUMNS)
    assert store.pending() == [] and predict_results(store.read()) == results


def test_an_address_nothing_listens_at_fails_in_seconds_not_minutes():
    import socket

    from toolkit.engines.ray import _check_reachable
    from toolkit.errors import BackendUnavailableError

    with socket.socket() as listener:  # a port that was free a moment ago: nothing listens there now
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(BackendUnavailableError, match="cannot reach the Ray cluster"):
            _check_reachable(address, timeout=2)
    with pytest.raises(UsageError, match="expected auto, host:port"):
        _check_reachable("nonsense")
    _check_reachable("auto")  # left to Ray, which finds RAY_ADDRESS or the cluster running here
