"""The ray engine against the local one: same numbers, same predictions, resumable shards, error rows.

One local Ray cluster (2 CPUs, no dashboard) serves the whole module; a killed run is a separate
`toolkit` process joining that cluster by address, so killing it is what a user's Ctrl-\\ or an OOM
kill does to a driver. The model is the bundled sample exported to ONNX (conftest).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'resnet-toolkit[ray]'")

from toolkit.data import write_sample_folder
from toolkit.engines import RunnerSpec, get_engine
from toolkit.engines.shards import SHARD_DIR

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]

EXACT_KEYS = ("accuracy", "top5", "macro", "micro", "weighted", "per_class", "confusion_matrix",
              "num_samples")
TOOLKIT = Path(sys.executable).with_name("toolkit")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster for this module; its GCS address lets other processes join it."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def spec(sample_onnx_fp32) -> RunnerSpec:
    return RunnerSpec(str(sample_onnx_fp32))


@pytest.fixture(scope="module")
def folder_2000(tmp_path_factory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("folder2000"), 2000)


def assert_same_eval(local, on_ray) -> None:
    """Metrics equal exactly; predictions equal; confidences equal up to float32 rounding."""
    a, b = local.report, on_ray.report
    da, db = a.to_dict(), b.to_dict()
    for key in EXACT_KEYS:
        assert da[key] == db[key], key
    assert db["calibration"]["ece"] == pytest.approx(da["calibration"]["ece"], rel=1e-9, abs=1e-12)
    assert db["calibration"]["nll"] == pytest.approx(da["calibration"]["nll"], rel=1e-9)
    assert b.ids == a.ids
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_array_equal(b.predictions, a.predictions)
    np.testing.assert_allclose(b.confidences, a.confidences, rtol=1e-5)
    np.testing.assert_allclose(b.true_probabilities, a.true_probabilities, rtol=1e-5, atol=1e-7)


def read_parts(folder: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p).to_pydict() for p in sorted(folder.glob("part-*.parquet"))}


def test_sample_matches_local_engine(ray_address, spec, sample_test):
    local = get_engine("local").evaluate(spec, sample_test, batch_size=64)
    on_ray = get_engine("ray").evaluate(spec, sample_test, batch_size=64, shard_size=100, replicas=1)
    assert on_ray.errors == []
    assert on_ray.report.metrics.num_samples == len(sample_test)
    assert_same_eval(local, on_ray)


def test_folder_of_2000_matches_local_and_a_killed_run_resumes(ray_address, spec, folder_2000, tmp_path):
    from toolkit.data import load_image_folder

    data = load_image_folder(folder_2000)
    assert len(data) == 2000
    local = get_engine("local").evaluate(spec, data, batch_size=50)
    whole = tmp_path / "whole"
    on_ray = get_engine("ray").evaluate(spec, data, batch_size=50, shard_size=50, output_dir=whole)
    assert_same_eval(local, on_ray)
    reference = read_parts(whole / SHARD_DIR)
    assert len(reference) == 40

    # A driver killed with SIGKILL part-way: some shards on disk, the rest not.
    resumed = tmp_path / "resumed"
    command = [str(TOOLKIT), "eval", "-m", spec.model, "--dataset", "folder", "--data-dir", str(folder_2000),
               "--engine", "ray", "--address", ray_address, "--batch-size", "10", "--shard-size", "50",
               "--output-dir", str(resumed), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = resumed / SHARD_DIR
    deadline = time.monotonic() + 120
    while len(list(shards.glob("part-*.parquet"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the ray run wrote no shards within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    finished_before = {p.name for p in shards.glob("part-*.parquet")}
    assert 3 <= len(finished_before) < 40, "the run was not stopped half-way"
    before = {name: (shards / name).stat().st_mtime_ns for name in finished_before}

    # Started again, from the command line, with the same --output-dir.
    from typer.testing import CliRunner

    from toolkit.cli import app

    result = CliRunner().invoke(app, command[1:-1])  # no --json: the rendered report, and the files
    assert result.exit_code == 0, result.output
    metrics = json.loads((resumed / "metrics.json").read_text())
    for key in EXACT_KEYS:
        assert metrics[key] == local.report.to_dict()[key], key
    with (resumed / "predictions.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["input"] for r in written] == local.report.ids
    assert [r["predicted"] for r in written] == [data.class_names[i] for i in local.report.predictions]
    assert {name: (shards / name).stat().st_mtime_ns for name in finished_before} == before  # left alone
    parts = read_parts(shards)
    assert parts.keys() == reference.keys()
    assert sorted(p.name for p in shards.iterdir()) == sorted(p.name for p in (whole / SHARD_DIR).iterdir())
    for name, rows in parts.items():
        for column in ("index", "input", "label", "predicted", "error"):
            assert rows[column] == reference[name][column], (name, column)
    indices = [i for rows in parts.values() for i in rows["index"]]
    assert sorted(indices) == list(range(2000))  # none lost, none twice
    assert json.loads((shards / "manifest.json").read_text())["complete"] is True


def test_bad_files_are_error_rows_not_a_failed_job(ray_address, spec, tmp_path):
    from toolkit.data import load_image_folder

    root = write_sample_folder(tmp_path / "images", 30)
    good = load_image_folder(root)
    first, second = sorted(p for p in root.iterdir())[:2]
    (first / "truncated.png").write_bytes(next(first.glob("*.png")).read_bytes()[:40])
    (second / "not-an-image.jpg").write_text("hello")
    with_bad = load_image_folder(root)
    run = get_engine("ray").evaluate(spec, with_bad, batch_size=8, shard_size=16, output_dir=tmp_path / "out")
    assert sorted(Path(e["input"]).name for e in run.errors) == ["not-an-image.jpg", "truncated.png"]
    assert all(e["error"] for e in run.errors)
    assert_same_eval(get_engine("local").evaluate(spec, good, batch_size=8), run)  # the readable rest
    rows = [r for part in read_parts(tmp_path / "out" / SHARD_DIR).values()
            for r in zip(part["input"], part["predicted"], part["error"])]
    assert len(rows) == 32
    assert sorted(Path(name).name for name, predicted, error in rows if error and not predicted) == [
        "not-an-image.jpg", "truncated.png"]


def test_predict_reads_files_folders_globs_and_fsspec_urls(ray_address, spec, tmp_path):
    import fsspec

    from toolkit.evaluate import PredictInput

    root = write_sample_folder(tmp_path / "images", 12)
    files = sorted(str(p) for p in root.rglob("*.png"))
    memory = fsspec.filesystem("memory")
    for path in files[:4]:
        memory.pipe(f"/ray-test/{Path(path).name}", Path(path).read_bytes())
    memory.pipe("/ray-test/broken.png", b"\x89PNG not really")
    first, second = sorted(root.iterdir())[:2]
    engine = get_engine("ray")
    items = engine.gather([str(first), str(second / "*.png"), f"file://{files[5]}",
                           "memory://ray-test", str(root / "missing.png")])
    in_memory = sorted(files[:4], key=lambda f: Path(f).name)  # memory:// lists by name
    local_items = get_engine("local").gather([str(first), str(second / "*.png"), files[5], *in_memory])
    results = engine.predict(spec, items, top_k=3, batch_size=4, shard_size=5,
                             output_dir=tmp_path / "out", shard_format="csv")
    assert len(results) == len(items)
    by_error = {r["input"]: r["error"] for r in results if "error" in r}
    assert sorted(by_error) == sorted(["memory:///ray-test/broken.png", str(root / "missing.png")])
    expected = get_engine("local").predict(spec, local_items, top_k=3, batch_size=4)
    answered = [r for r in results if "top" in r]
    assert len(answered) == len(expected)
    for got, want in zip(answered, expected):
        assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]],
                                   [t["probability"] for t in want["top"]], rtol=1e-5)
    # A rerun finds every csv shard finished and answers from them alone.
    again = engine.predict(spec, items, top_k=3, batch_size=4, shard_size=5,
                           output_dir=tmp_path / "out", shard_format="csv")
    assert again == results
    assert isinstance(items[0], PredictInput)


def test_eval_on_a_memory_url_folder_equals_the_same_folder_on_disk(ray_address, spec, tmp_path):
    import fsspec

    from toolkit.data import load_image_folder
    from toolkit.engines.sources import load_dataset

    root = write_sample_folder(tmp_path / "images", 24)
    memory = fsspec.filesystem("memory")
    for path in root.rglob("*.png"):
        memory.pipe(f"/ray-folder/{path.parent.name}/{path.name}", path.read_bytes())
    remote = load_dataset("folder", Path("memory://ray-folder"))  # as Typer's Path option hands it over
    assert remote.class_names == load_image_folder(root).class_names and len(remote) == 24
    on_ray = get_engine("ray").evaluate(spec, remote, batch_size=8)
    local = get_engine("local").evaluate(spec, load_image_folder(root), batch_size=8)
    assert on_ray.errors == []
    for key in EXACT_KEYS:
        assert on_ray.report.to_dict()[key] == local.report.to_dict()[key]
    np.testing.assert_array_equal(on_ray.report.predictions, local.report.predictions)


def test_cli_predict_on_ray_and_option_errors(ray_address, spec, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from toolkit.cli import app

    root = write_sample_folder(tmp_path / "images", 6)
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "-m", spec.model, str(root), "--engine", "ray", "-f", "json",
                                 "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    local = runner.invoke(app, ["predict", "-m", spec.model, str(root), "-f", "json"])
    assert [a["top"][0]["class"] for a in answers] == [a["top"][0]["class"] for a in json.loads(local.stdout)]
    assert (tmp_path / "out" / SHARD_DIR / "part-00000.parquet").is_file()

    result = runner.invoke(app, ["predict", "-m", spec.model, str(root), "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas only apply to --engine ray" in result.output

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    result = runner.invoke(app, ["predict", "-m", spec.model, str(root), "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'resnet-toolkit[ray]'" in result.output and "Traceback" not in result.output


@dataclass(frozen=True)
class DiesOnceSpec(RunnerSpec):
    """Opens the real model, but the first replica to run a batch kills its own process (os._exit),
    as an OOM kill or a segfaulting runtime would: Ray must restart it and run the batch again."""

    marker: str = ""

    def open(self) -> Any:
        runner, marker = super().open(), Path(self.marker)

        class Dying:
            card = runner.card

            def __call__(self, batch: np.ndarray) -> np.ndarray:
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)
                return runner(batch)

        return Dying()


def test_a_replica_that_dies_is_restarted_and_its_batch_retried(ray_address, spec, sample_test, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test file
    marker = tmp_path / "died"
    dying = DiesOnceSpec(spec.model, marker=str(marker))
    on_ray = get_engine("ray").evaluate(dying, sample_test.subset(120), batch_size=40, replicas=1)
    assert marker.exists(), "no replica died: the test proves nothing"
    assert on_ray.errors == []
    assert_same_eval(get_engine("local").evaluate(spec, sample_test.subset(120), batch_size=40), on_ray)
