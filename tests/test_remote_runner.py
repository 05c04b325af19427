"""RemoteRunner against the real server: same card, same logits, same eval numbers as the local Runner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.serve import running_server
from toolkit.errors import ModelFormatError, UsageError
from toolkit.preprocess import preprocess
from toolkit.runtime.remote_runner import RemoteRunner, _card_from_config, parse_url


@pytest.fixture(scope="module")
def local(sample_onnx_runner):
    return sample_onnx_runner


@pytest.fixture(scope="module")
def base(local):
    with running_server(local, max_batch_size=8) as (url, _):
        yield url


def test_parse_url_forms():
    assert parse_url("http://h:9/resnet20") == ("http", "h", 9, "", "resnet20", "")
    assert parse_url("http://h:9/v2/models/resnet20") == ("http", "h", 9, "", "resnet20", "")
    assert parse_url("http://h/proxy/v2/models/m/versions/3") == ("http", "h", 80, "/proxy", "m", "3")
    with pytest.raises(UsageError):
        parse_url("http://h:9/")
    assert _card_from_config({}) is None
    assert _card_from_config({"parameters": {"toolkit.card": {"string_value": "x"}}}) is None


def test_remote_runner_matches_local(base, local, sample_test):
    from toolkit.runtime.registry import open_model

    with open_model(f"{base}/digits") as remote:
        assert isinstance(remote, RemoteRunner) and remote.backend == "remote"
        assert remote.card == local.card and remote.max_batch_size == 8
        batch = preprocess(sample_test.images[:20], local.card)  # more than max_batch_size: chunked
        np.testing.assert_allclose(remote(batch), local(batch), rtol=1e-5, atol=1e-5)
    with RemoteRunner.open(f"{base}/v2/models/digits/versions/1") as remote:
        np.testing.assert_allclose(remote(batch[:2]), local(batch[:2]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelFormatError, match="no model"):
        RemoteRunner.open(f"{base}/other")


def test_card_without_server_card_uses_preset_and_classification_labels(base, local):
    remote = RemoteRunner.open(f"{base}/digits")
    meta = remote._get_json(remote._model_path)
    card = remote._card_from_metadata(meta["inputs"][0], meta["outputs"][0])
    assert card.class_names == local.card.class_names  # from "value:index:label" strings
    assert card.input_size == (3, 32, 32) and card.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    remote.close()


def test_eval_cli_against_the_server(base, local, sample_test):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.evaluate import evaluate

    result = CliRunner().invoke(app, ["eval", "-m", f"{base}/digits", "--dataset", "sample", "--limit", "60",
                                      "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    offline = evaluate(local, sample_test.subset(60)).to_dict()
    assert got["backend"] == "remote" and got["accuracy"] == offline["accuracy"]
    assert got["confusion_matrix"] == offline["confusion_matrix"]
