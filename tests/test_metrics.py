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
from toolkit.metrics import ConfusionMatrix, topk_hits

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
    precision, recall, f1, support = cm.per_class()
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
    scores = rng.integers(0, 4, size=(size, n_classes)).astype(float) if coarse else rng.normal(size=(size, n_classes))
    labels = rng.integers(0, n_classes, size=size)
    cm = ConfusionMatrix(n_classes, top_k=(1, 3, 5)).add_scores(labels, scores)
    for k in (3, 5):
        expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes))
        assert abs(cm.topk_accuracy(k) - expected) <= TOL
