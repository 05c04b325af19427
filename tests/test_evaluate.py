"""evaluate(): metrics equal scikit-learn's, every dataset format gives the same answers, outputs are
written."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from fakes.runners import ConstantRunner
from support.cifar import write_cifar
from toolkit.card import ModelCard, generic_class_names
from toolkit.data import Dataset, load_cifar, load_image_folder, load_sample
from toolkit.errors import DataError
from toolkit.evaluate import EvalReport, collect_logits, evaluate, prefetched
from toolkit.runtime.registry import open_model

CONTRACT_KEYS = {"accuracy", "top5", "macro", "micro", "weighted", "per_class", "confusion_matrix",
                 "num_samples", "images_per_second", "backend", "model"}
LIMIT = 60


@pytest.fixture(scope="module")
def torch_runner(sample_model):
    with open_model(sample_model) as runner:
        yield runner


@pytest.fixture(scope="module")
def sample_subset():
    return load_sample("test").subset(LIMIT)


@pytest.fixture(scope="module")
def torch_report(torch_runner, sample_subset) -> EvalReport:
    return evaluate(torch_runner, sample_subset, batch_size=50)


def check_against_sklearn(report: EvalReport) -> None:
    data = report.to_dict()
    y, p = report.labels, report.predictions
    assert data["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-9)
    for kind in ("macro", "micro", "weighted"):
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, average=kind, zero_division=0)
        assert data[kind] == pytest.approx({"precision": prec, "recall": rec, "f1": f1}, abs=1e-9)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=range(len(report.class_names)),
                                                         average=None, zero_division=0)
    for i, row in enumerate(data["per_class"]):
        assert row["precision"] == pytest.approx(prec[i], abs=1e-9)
        assert row["recall"] == pytest.approx(rec[i], abs=1e-9)
        assert row["f1"] == pytest.approx(f1[i], abs=1e-9)
        assert row["support"] == sup[i]


@pytest.mark.slow
def test_torch_eval_matches_sklearn_and_logits(torch_runner, sample_subset, torch_report):
    data = torch_report.to_dict()
    assert set(data) >= CONTRACT_KEYS
    assert data["num_samples"] == LIMIT and data["backend"] == "torch"
    assert data["accuracy"] > 0.95 and data["top5"] >= data["accuracy"]
    assert data["images_per_second"] > 0
    assert data["model_images_per_second"] >= data["images_per_second"] * 0.5
    logits = collect_logits(torch_runner, sample_subset, batch_size=32)
    np.testing.assert_array_equal(torch_report.predictions, logits.argmax(1))
    check_against_sklearn(torch_report)
    json.dumps(data)  # JSON-serialisable as it is


def test_onnx_eval_agrees_with_torch(sample_onnx_fp32, sample_subset, torch_report):
    with open_model(sample_onnx_fp32) as runner:
        report = evaluate(runner, sample_subset, batch_size=64)
    assert report.backend == "onnxruntime"
    assert (report.predictions == torch_report.predictions).mean() >= 0.99
    np.testing.assert_allclose(report.confidences, torch_report.confidences, atol=1e-3)
    check_against_sklearn(report)


@pytest.mark.slow
def test_int8_onnx_eval(sample_onnx_int8, sample_subset, torch_report):
    with open_model(sample_onnx_int8) as runner:
        report = evaluate(runner, sample_subset, batch_size=64)
    assert report.precision == "int8"
    assert (report.predictions == torch_report.predictions).mean() >= 0.95
    assert report.accuracy >= torch_report.accuracy - 0.05
    check_against_sklearn(report)


@pytest.mark.slow
def test_a_limited_eval_says_how_it_drew_and_precision_agreement_pairs_the_same_images(torch_runner,
                                                                                      torch_report):
    """--limit draws a class-balanced subset; comparing on fewer images pairs each answer with its own
    image (an fp32 runner against itself: agreement 1, equal accuracies)."""
    from toolkit.evaluate import precision_agreement

    assert torch_report.to_dict()["sampling"] == f"{LIMIT} of 360 images, class-balanced (seed 0)"
    check = precision_agreement(torch_runner, torch_report, limit=20)
    assert check["num_samples"] == 20 and check["top1_agreement"] == 1.0
    assert check["accuracy"] == check["reference_accuracy"]
    chosen = torch_report.data.subset_indices(20)
    assert check["accuracy"] == pytest.approx(np.mean(torch_report.predictions[chosen] ==
                                                      torch_report.labels[chosen]))


@pytest.mark.slow
def test_outputs_written(torch_report, tmp_path):
    from toolkit.report import write_eval_outputs

    written = write_eval_outputs(torch_report, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names >= {"confusion_matrix.csv", "confusion_matrix.png", "metrics.json", "per_class_f1.png",
                     "predictions.csv", "report.html"}  # the contract's files; reports may add more
    assert set(written) >= {"metrics", "predictions", "html"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) >= CONTRACT_KEYS
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,input,label,predicted,confidence" and len(rows) == LIMIT + 1
    index, name, label, predicted, conf = rows[1].split(",")
    assert index == "0" and name == torch_report.ids[0] == "sample-test[4]"  # the source's own index
    assert label == torch_report.class_names[torch_report.labels[0]]
    assert predicted == torch_report.class_names[torch_report.predictions[0]]
    assert float(conf) == pytest.approx(torch_report.confidences[0], abs=1e-6) and 0 < float(conf) <= 1
    cm_rows = (tmp_path / "out" / "confusion_matrix.csv").read_text().splitlines()
    assert [int(v) for v in cm_rows[1].split(",")[1:]] == torch_report.metrics.matrix[0].tolist()
    plots = sorted((tmp_path / "out").glob("*.png"))
    assert all(png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for png in plots)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(plots) and "src=\"http" not in html  # self-contained
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind


def test_outputs_without_matplotlib(torch_report, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from toolkit.report import write_eval_outputs

    write_eval_outputs(torch_report, tmp_path)
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.html").is_file()
    assert "matplotlib is not installed" in capsys.readouterr().err


# --- dataset formats: all must give the same confusion matrix as the sample itself ----------------

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar_formats(tmp_path, kind, bytes_keys, torch_runner, sample_subset, torch_report):
    write_cifar(tmp_path, kind, sample_subset.images, sample_subset.labels, list(sample_subset.class_names),
                bytes_keys)
    data = load_cifar(tmp_path, kind, "test")
    assert len(data) == LIMIT and data.class_names == sample_subset.class_names
    report = evaluate(torch_runner, data, batch_size=64)
    np.testing.assert_array_equal(report.metrics.matrix, torch_report.metrics.matrix)
    assert len(load_cifar(tmp_path, kind, "train")) == 5


def test_image_folder_equals_arrays(tmp_path, torch_runner, sample_subset, torch_report):
    from PIL import Image

    for i, (image, label) in enumerate(zip(sample_subset.images, sample_subset.labels)):
        folder = tmp_path / sample_subset.class_names[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    data = load_image_folder(tmp_path)
    report = evaluate(torch_runner, data, batch_size=32)
    np.testing.assert_array_equal(report.metrics.matrix, torch_report.metrics.matrix)
    assert report.ids[0].endswith(".png")


def test_folder_class_mismatch_lists_both(tmp_path, torch_runner):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / name / "a.png")
    with pytest.raises(DataError) as info:
        evaluate(torch_runner, load_image_folder(tmp_path))
    assert "'cat'" in str(info.value) and "'9'" in str(info.value)


def test_generic_class_names_take_labels_by_index(sample_subset):
    card = ModelCard(arch="resnet20", class_names=generic_class_names(10), input_size=(3, 32, 32),
                     resize_size=32)
    runner = ConstantRunner(card, source="const")
    report = evaluate(runner, sample_subset, batch_size=40)
    assert report.class_names == card.class_names
    assert report.to_dict()["num_samples"] == report.metrics.num_samples == LIMIT
    # The data's classes are "0".."9", the model's class_0..class_9: label i is taken as class_i, unpermuted.
    np.testing.assert_array_equal(report.labels, sample_subset.labels)
    answers = collect_logits(runner, sample_subset).argmax(1)
    np.testing.assert_array_equal(report.predictions, answers)
    assert report.accuracy == pytest.approx((answers == sample_subset.labels).mean())


def test_unlabelled_dataset_is_refused(sample_card):
    data = Dataset("x", sample_card.class_names, None, images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="no labels"):
        evaluate(ConstantRunner(sample_card, source="c"), data)


def test_progress_callback_counts_every_image(sample_subset, sample_card):
    seen = []
    evaluate(ConstantRunner(sample_card, source="c"), sample_subset, batch_size=25, progress=seen.append)
    assert seen == [25, 25, 10]


# --- the prefetch thread ----------------------------------------------------------------------------

@pytest.mark.slow
def test_prefetched_order_errors_and_early_stop():
    assert list(prefetched(range(10), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise DataError("broken file")

    with pytest.raises(DataError, match="broken"):
        list(prefetched(failing()))

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for item in prefetched(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert len(produced) <= 8  # bounded: the producer never ran far ahead
    assert threading.active_count() <= before  # and it stopped


@pytest.mark.slow
def test_prefetch_overlaps_preparation_with_inference(sample_card):
    """Slow data + slow model: end-to-end time is near max(data, model), not their sum."""
    class SlowData(Dataset):
        def batches(self, card, batch_size):
            for raw in self.uint8_batches(card, batch_size):
                time.sleep(0.05)
                yield raw.astype(np.float32).transpose(0, 3, 1, 2).copy()

    class SlowRunner(ConstantRunner):
        def _infer(self, batch):
            time.sleep(0.05)
            return super()._infer(batch)

    data = SlowData("slow", sample_card.class_names, np.zeros(10, np.int64),
                    images=np.zeros((10, 32, 32, 3), np.uint8))
    report = evaluate(SlowRunner(sample_card, source="slow"), data, batch_size=1)
    assert report.timing.total_seconds < 0.8  # serial would be >= 1.0 s
    assert report.timing.images == 9 and report.timing.warmup_images == 1
