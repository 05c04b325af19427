"""ConfusionMatrix against scikit-learn, number by number, to 1e-9."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from toolkit.errors import InputError
from toolkit.metrics import Calibration, ConfusionMatrix, top_confusions, topk_hits

TOL = 1e-9


def assert_matches_sklearn(cm: ConfusionMatrix, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    n = cm.num_classes
    labels = np.arange(n)
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(y_true, y_pred, labels=labels))
    assert cm.num_samples == len(y_true)
    assert abs(cm.accuracy - accuracy_score(y_true, y_pred)) <= TOL
    # per class: every class of the model, as sklearn with labels=range(n)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    mp, mr, mf, ms = cm.per_class()
    np.testing.assert_allclose(mp, p, rtol=0, atol=TOL)
    np.testing.assert_allclose(mr, r, rtol=0, atol=TOL)
    np.testing.assert_allclose(mf, f, rtol=0, atol=TOL)
    np.testing.assert_array_equal(ms, s)
    # averages: sklearn's default labels (classes present in y_true or y_pred)
    for kind in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=kind, zero_division=0)
        ours = cm.average(kind)
        assert abs(ours["precision"] - p) <= TOL, kind
        assert abs(ours["recall"] - r) <= TOL, kind
        assert abs(ours["f1"] - f) <= TOL, kind


def test_known_example():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2, 2])
    cm = ConfusionMatrix.from_predictions(y_true, y_pred, num_classes=5)
    assert_matches_sklearn(cm, y_true, y_pred)
    # class 3 is never predicted (precision 0 by zero_division), class 4 never occurs at all
    precision, recall, _, support = cm.per_class()
    assert precision[3] == 0 and recall[3] == 0 and support[4] == 0
    assert cm.accuracy == pytest.approx(5 / 8)


def test_absent_classes_do_not_enter_the_averages():
    # class 2 appears in neither labels nor predictions: sklearn's default averages skip it
    y_true = np.array([0, 1, 1, 3])
    y_pred = np.array([0, 1, 3, 3])
    cm = ConfusionMatrix.from_predictions(y_true, y_pred, num_classes=4)
    assert_matches_sklearn(cm, y_true, y_pred)
    assert cm.present().tolist() == [True, True, False, True]


def test_topk_matches_sklearn_including_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 7)).astype(np.float32)  # many ties on purpose
    labels = rng.integers(0, 7, size=200)
    for k in (1, 2, 5):
        ours = topk_hits(scores, labels, k) / len(labels)
        assert abs(ours - top_k_accuracy_score(labels, scores, k=k, labels=np.arange(7))) <= TOL


def test_scores_batches_merge_equals_whole():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(300, 12))
    labels = rng.integers(0, 12, size=300)
    whole = ConfusionMatrix(12).add_scores(labels, scores)
    parts = [ConfusionMatrix(12).add_scores(labels[i:i + 64], scores[i:i + 64]) for i in range(0, 300, 64)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert merged == whole
    assert abs(whole.top5 - top_k_accuracy_score(labels, scores, k=5, labels=np.arange(12))) <= TOL
    assert_matches_sklearn(whole, labels, scores.argmax(1))
    assert parts[0].num_samples == 64  # merge did not mutate its inputs


def test_top5_only_with_five_or_more_classes():
    cm = ConfusionMatrix(3).add_scores(np.array([0, 1]), np.eye(3)[:2])
    assert cm.top5 is None
    assert cm.to_dict()["top5"] is None
    assert ConfusionMatrix(5).add_scores(np.array([4]), np.eye(5)[:1]).top5 == 1.0


def test_to_dict_keys_and_names():
    cm = ConfusionMatrix.from_predictions(np.array([0, 1]), np.array([0, 0]), num_classes=2)
    data = cm.to_dict(["cat", "dog"])
    assert set(data) >= {"accuracy", "top5", "macro", "micro", "weighted", "per_class", "confusion_matrix",
                         "num_samples"}
    assert data["per_class"][1] == {"class": "dog", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert data["confusion_matrix"] == [[1, 0], [1, 0]]
    with pytest.raises(InputError):
        cm.to_dict(["only-one"])


def test_bad_inputs_are_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(InputError, match="outside"):
        cm.add(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(InputError, match="labels but"):
        cm.add(np.array([0, 1]), np.array([0]))
    with pytest.raises(InputError, match="merge"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(InputError, match="integer"):
        cm.add(np.array([0.5]), np.array([0]))


def test_empty_matrix_is_all_zeros():
    cm = ConfusionMatrix(4)
    assert cm.accuracy == 0.0 and cm.top5 is None
    assert cm.average("macro") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


@st.composite
def label_pairs(draw):
    n_classes = draw(st.integers(2, 9))
    size = draw(st.integers(1, 60))
    # restrict both sides to random subsets so some classes are missing from labels, predictions or both
    true_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    pred_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    y_true = draw(st.lists(st.sampled_from(true_pool), min_size=size, max_size=size))
    y_pred = draw(st.lists(st.sampled_from(pred_pool), min_size=size, max_size=size))
    return n_classes, np.array(y_true), np.array(y_pred)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(label_pairs(), st.integers(1, 5))
def test_property_matches_sklearn_and_merges(data, split_parts):
    n_classes, y_true, y_pred = data
    cm = ConfusionMatrix.from_predictions(y_true, y_pred, num_classes=n_classes)
    assert_matches_sklearn(cm, y_true, y_pred)
    chunks = np.array_split(np.arange(len(y_true)), split_parts)
    merged = ConfusionMatrix(n_classes)
    for idx in chunks:
        merged = merged + ConfusionMatrix(n_classes).add(y_true[idx], y_pred[idx])
    assert merged == cm


@settings(max_examples=60, deadline=None)
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(st.integers(5, 12), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_property_topk_matches_sklearn(n_classes, size, seed, coarse):
    rng = np.random.default_rng(seed)
    shape = (size, n_classes)
    scores = rng.integers(0, 4, size=shape).astype(float) if coarse else rng.normal(size=shape)
    labels = rng.integers(0, n_classes, size=size)
    cm = ConfusionMatrix(n_classes, top_k=(1, 3, 5)).add_scores(labels, scores)
    for k in (3, 5):
        expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes))
        assert abs(cm.topk_accuracy(k) - expected) <= TOL


# --- calibration: ECE/MCE against torchmetrics, NLL/Brier against scikit-learn ----------------------

def _logits(seed: int, n: int = 3000, classes: int = 10, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose confidences spread over all 15 bins, and labels that agree with them ~60 % of the time."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.2, scale, size=(n, 1))
    labels = np.where(rng.random(n) < 0.6, logits.argmax(1), rng.integers(0, classes, n))
    return logits, labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_match_torchmetrics(seed):
    import torch
    from torchmetrics.classification import MulticlassCalibrationError
    from torchmetrics.functional.classification.calibration_error import _ce_compute

    logits, labels = _logits(seed)
    probs = _softmax(logits)
    ours = Calibration(15).add_logits(labels, logits)
    assert ours.num_samples == len(labels) and (ours.counts > 0).sum() >= 12  # the bins really are exercised
    for norm, value in (("l1", ours.ece), ("max", ours.mce)):
        # The public metric computes in float32: agreement to float32 precision.
        metric = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)
        reference = float(metric(torch.from_numpy(probs.astype(np.float32)), torch.from_numpy(labels)))
        assert abs(value - reference) <= 2e-6, norm
        # Its binning routine on float64 inputs: the same definition, to 1e-9.
        confidences = torch.from_numpy(probs.max(1))
        accuracies = torch.from_numpy((probs.argmax(1) == labels).astype(np.float64))
        assert abs(value - float(_ce_compute(confidences, accuracies, 15, norm=norm))) <= TOL, norm


def test_nll_and_brier_match_sklearn_and_the_formula():
    from sklearn.metrics import brier_score_loss, log_loss

    logits, labels = _logits(3, n=1000, classes=7)
    probs = _softmax(logits)
    ours = Calibration().add_logits(labels, logits)
    assert abs(ours.nll - log_loss(labels, probs, labels=np.arange(7))) <= TOL
    onehot = np.eye(7)[labels]
    direct = float(((probs - onehot) ** 2).sum(1).mean())
    assert abs(ours.brier - direct) <= TOL
    assert abs(ours.brier - brier_score_loss(labels, probs, labels=np.arange(7))) <= TOL


def test_calibration_merges_and_serialises():
    logits, labels = _logits(4, n=500)
    whole = Calibration().add_logits(labels, logits)
    merged = Calibration()
    for start in range(0, 500, 128):
        merged = merged + Calibration().add_logits(labels[start:start + 128], logits[start:start + 128])
    assert merged == whole
    assert abs(merged.nll - whole.nll) <= TOL and abs(merged.brier - whole.brier) <= TOL
    data = whole.to_dict()
    assert set(data) >= {"ece", "mce", "nll", "brier", "n_bins", "bins"} and data["n_bins"] == 15
    assert sum(b["count"] for b in data["bins"]) == 500
    assert data["bins"][0]["lower"] == 0.0 and data["bins"][-1]["upper"] == 1.0
    with pytest.raises(InputError, match="merge"):
        whole.merge(Calibration(10))


def test_calibration_edges_and_extremes():
    cal = Calibration(15)
    # 0 and 1 belong to the first and last bins; a value on an inner edge starts the next bin ([lo, hi)).
    assert cal.bin_of(np.array([0.0, 1.0, 1 / 15 + 1e-12, 0.5])).tolist() == [0, 14, 1, 7]
    # Logits far apart: probabilities of exactly 0 and 1 in float64, yet NLL stays finite (log-softmax).
    logits = np.array([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0]])
    cal.add_logits(np.array([0, 0]), logits)
    assert cal.counts[14] == 2 and cal.correct[14] == 1
    assert cal.nll == pytest.approx(1e4 / 2) and np.isfinite(cal.brier) and cal.brier == pytest.approx(1.0)
    assert cal.ece == pytest.approx(0.5) and cal.mce == pytest.approx(0.5)
    empty = Calibration()
    assert empty.ece == 0.0 and empty.mce == 0.0 and empty.nll is None and empty.to_dict()["brier"] is None
    with pytest.raises(InputError, match="probabilities"):
        Calibration().add_confidences(np.array([1.5]), np.array([True]))
    with pytest.raises(InputError, match="outside"):
        Calibration().add_logits(np.array([3]), np.zeros((1, 3)))


def test_top_confusions_counts_shares_and_order():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    y_pred = np.array([1, 1, 0, 0, 2, 0, 0, 2, 2, 2])
    matrix = confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    rows = top_confusions(matrix, ["cat", "dog", "$x$"], limit=3)
    # 6 mistakes: cat->dog 2, $x$->cat 2 (tie: lower true index first), dog->cat 1, dog->$x$ 1
    assert [(r["true"], r["predicted"], r["count"]) for r in rows] == [("cat", "dog", 2), ("$x$", "cat", 2),
                                                                      ("dog", "cat", 1)]
    assert rows[0]["share"] == pytest.approx(2 / 6) and rows[0]["true_class_rate"] == pytest.approx(2 / 3)
    assert top_confusions(np.eye(3, dtype=int), ["a", "b", "c"]) == []
