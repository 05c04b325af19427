"""`toolkit compare`: McNemar's exact test against statsmodels, pairing two reports, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from support.cli import invoke
from test_report import make_report
from toolkit.compare import binomial_two_sided_p, compare_reports, mcnemar_exact
from toolkit.errors import DataError

TOL = 1e-9


def statsmodels_p(a_only: int, b_only: int) -> float:
    return float(mcnemar(np.array([[50, a_only], [b_only, 7]]), exact=True).pvalue)


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (0, 1), (1, 0), (3, 3), (1, 9), (12, 30), (40, 41),
                                            (0, 200), (480, 520), (2500, 2620), (20_000, 20_900)])
def test_p_value_matches_statsmodels(a_only, b_only):
    assert abs(binomial_two_sided_p(a_only, a_only + b_only) - statsmodels_p(a_only, b_only)) <= TOL


def test_p_value_grid_and_bounds():
    for n in range(80):
        for k in range(n + 1):
            assert abs(binomial_two_sided_p(k, n) - statsmodels_p(k, n - k)) <= TOL, (k, n)
    assert binomial_two_sided_p(0, 0) == 1.0
    assert binomial_two_sided_p(0, 1000) == pytest.approx(2.0 ** -999, rel=1e-12)  # tiny, not rounded early
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_two_sided_p(5, 3)


def test_mcnemar_from_paired_outcomes():
    rng = np.random.default_rng(0)
    a = rng.random(5000) < 0.90
    b = np.where(rng.random(5000) < 0.05, ~a, a)
    test = mcnemar_exact(a, b)
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    assert [test.both_right, test.a_only, test.b_only, test.both_wrong] == table.ravel().tolist()
    assert abs(test.p_value - mcnemar(table, exact=True).pvalue) <= TOL
    assert test.to_dict()["discordant"] == test.a_only + test.b_only
    assert test.verdict == ("the difference is significant at 0.05" if test.p_value < 0.05
                            else "the difference is not significant at 0.05")
    clearly = mcnemar_exact(np.ones(100, bool), np.r_[np.zeros(20, bool), np.ones(80, bool)])
    assert clearly.significant and clearly.verdict == "the difference is significant at 0.05"
    assert "A right where B is wrong: 20" in clearly.summary()
    with pytest.raises(DataError, match="length"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def test_compare_reports_pairs_by_class_name():
    names = ("cat", "dog", "eel", "fox")
    a, b = make_report(names, seed=0), make_report(names, seed=1)
    comparison = compare_reports(a, b)
    data = comparison.to_dict()
    assert data["agreement"] == pytest.approx(np.mean(a.predictions == b.predictions))
    rows = data["disagreements"]
    assert len(rows) == int((a.predictions != b.predictions).sum()) > 0
    strength = [max(r["a_confidence"], r["b_confidence"]) for r in rows]
    assert strength == sorted(strength, reverse=True)
    by_metric = {m["metric"]: m for m in data["metrics"]}
    assert by_metric["accuracy"]["delta"] == pytest.approx(b.accuracy - a.accuracy)
    assert by_metric["ece"]["b"] == pytest.approx(b.calibration.ece) and by_metric["ece"]["lower_is_better"]
    f1_a = {r["class"]: r["f1"] for r in a.to_dict()["per_class"]}
    f1_b = {r["class"]: r["f1"] for r in b.to_dict()["per_class"]}
    assert {r["class"]: r["f1_delta"] for r in data["per_class"]} == pytest.approx(
        {k: f1_b[k] - f1_a[k] for k in names})
    expected = statsmodels_p(data["mcnemar"]["a_only_right"], data["mcnemar"]["b_only_right"])
    assert abs(data["mcnemar"]["p_value"] - expected) <= TOL

    # The same model with its classes in another order: identical answers, agreement 1, p = 1.
    from test_report import LinearRunner, dataset
    from toolkit.card import ModelCard
    from toolkit.evaluate import evaluate

    card = ModelCard(arch="resnet20", class_names=names, input_size=(3, 8, 8), resize_size=8)
    runner = LinearRunner(card, seed=0)
    permuted = LinearRunner(ModelCard(arch="resnet20", class_names=names[::-1], input_size=(3, 8, 8),
                                      resize_size=8), seed=0)
    permuted.weights = runner.weights[:, ::-1].copy()
    same = compare_reports(evaluate(runner, dataset(names)), evaluate(permuted, dataset(names)))
    assert same.agreement == 1.0 and same.test.p_value == 1.0 and same.disagreement_rows() == []


def test_reports_that_cannot_be_paired_are_refused():
    a = make_report(("cat", "dog"), n=50)
    with pytest.raises(DataError, match="do not share their classes"):
        compare_reports(a, make_report(("cat", "cow"), n=50))
    with pytest.raises(DataError, match="different images"):
        compare_reports(a, make_report(("cat", "dog"), n=40))


@pytest.mark.slow
def test_compare_command_on_fp32_and_int8(sample_model, sample_onnx_int8, tmp_path):
    result = invoke("compare", "-m", sample_model, "-m", sample_onnx_int8, "--dataset", "sample", "--json",
                    "--output-dir", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_samples"] == 360 and data["b"]["precision"] == "int8"
    test = data["mcnemar"]
    assert test["both_right"] + test["a_only_right"] + test["b_only_right"] + test["both_wrong"] == 360
    assert abs(test["p_value"] - statsmodels_p(test["a_only_right"], test["b_only_right"])) <= TOL
    assert test["verdict"] in ("the difference is significant at 0.05",
                               "the difference is not significant at 0.05")
    assert data["agreement"] == pytest.approx(1 - len(data["disagreements"]) / 360)
    assert {m["metric"] for m in data["metrics"]} >= {"accuracy", "macro_f1", "ece", "nll", "brier"}
    files = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert files == ["comparison.json", "disagreements.csv", "per_class_deltas.csv", "report.html"]
    csv_rows = (tmp_path / "cmp" / "disagreements.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(data["disagreements"])
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "McNemar" in page and page.count('class="thumb"') == min(64, len(data["disagreements"]))

    result = invoke("compare", "-m", sample_model, "-m", sample_onnx_int8, "--dataset", "sample",
                    "--limit", "60")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "significant at 0.05" in result.output


def test_compare_command_usage_errors(sample_model):
    result = invoke("compare", "-m", sample_model, "--dataset", "sample")
    assert result.exit_code == 2 and "exactly two models" in result.output
    result = invoke("compare", "-m", sample_model, "-m", sample_model)
    assert result.exit_code == 2 and "--dataset is required" in result.output
