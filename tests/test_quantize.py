"""int8 Q/DQ: balanced seeded calibration, u8/s8 types, accuracy within a point of fp32."""

from __future__ import annotations

import numpy as np
import pytest

from export.quantize import quantize, select_calibration
from toolkit.artifacts import ONNX_FACTS_KEY, ArtifactFacts
from toolkit.data import Dataset
from toolkit.errors import UsageError
from toolkit.evaluate import collect_logits, top1_accuracy
from toolkit.names import CALIB_METHODS
from toolkit.runtime.registry import open_model, read_artifact


def toy(labels: list[int]) -> Dataset:
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return Dataset("toy", ("a", "b", "c"), np.asarray(labels), images)


def test_calibration_is_class_balanced_and_seeded():
    data = toy([0] * 50 + [1] * 30 + [2] * 5)
    picked = select_calibration(data, 30, seed=3)
    counts = np.bincount(picked.labels, minlength=3)
    assert len(picked) == 30 and counts[2] == 5 and abs(counts[0] - counts[1]) <= 1  # c runs out, a/b share
    again = select_calibration(data, 30, seed=3)
    assert (again.images == picked.images).all()
    assert not (select_calibration(data, 30, seed=4).images == picked.images).all()
    assert len(select_calibration(data, 1000)) == len(data)


def test_int8_without_data_is_a_clear_error(tmp_path, sample_onnx_fp32, sample_card):
    with pytest.raises(UsageError, match="calibration"):
        quantize(sample_onnx_fp32, sample_card, tmp_path / "q.onnx", None)
    assert not list(tmp_path.iterdir())


def test_qdq_layout_u8_activations_s8_per_channel_weights(sample_onnx_int8):
    import onnx

    proto = onnx.load(str(sample_onnx_int8))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    inits = {t.name: t for t in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    per_channel = [n for n in weight_dq if len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert per_channel
    props = {p.key: p.value for p in proto.metadata_props}
    facts = ArtifactFacts.from_json(props[ONNX_FACTS_KEY])
    assert facts.precision == "int8" and "toolkit.card" in props and "method=minmax" in facts.calibration


def test_unknown_calibration_method_or_activation_type_names_the_choices(sample_onnx_fp32, sample_card,
                                                                        tmp_path):
    data = toy([0, 1])
    with pytest.raises(UsageError, match="choose one of minmax, entropy, percentile"):
        quantize(sample_onnx_fp32, sample_card, tmp_path / "q.onnx", data, method="histogram")
    with pytest.raises(UsageError, match="activations must be one of u8, s8"):
        quantize(sample_onnx_fp32, sample_card, tmp_path / "q.onnx", data, activations="u16")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_loses_at_most_one_point(sample_onnx_fp32, sample_onnx_int8, sample_test, backend):
    with open_model(sample_onnx_fp32) as fp32, open_model(sample_onnx_int8, backend=backend) as int8:
        ref, out = collect_logits(fp32, sample_test), collect_logits(int8, sample_test)
    assert top1_accuracy(ref, sample_test.labels) - top1_accuracy(out, sample_test.labels) <= 0.01
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("method", CALIB_METHODS)
def test_quantize_knows_every_calibration_method(sample_onnx_fp32, sample_card, sample_test, tmp_path,
                                                 method):
    """Every --calib-method the CLI offers gives a Q/DQ int8 file whose facts name the method."""
    import onnx

    path = quantize(sample_onnx_fp32, sample_card, tmp_path / f"{method}.onnx", sample_test, calib_size=16,
                    method=method)
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    card, facts = read_artifact(path)
    assert card == sample_card and facts.precision == "int8"
    assert f"method={method}" in facts.calibration


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(tmp_path, sample_onnx_fp32, sample_card, sample_test, method):
    from toolkit.data import load_sample

    path = quantize(sample_onnx_fp32, sample_card, tmp_path / "q.onnx", load_sample("train"), calib_size=128,
                    method=method)
    with open_model(path) as runner:
        assert top1_accuracy(collect_logits(runner, sample_test), sample_test.labels) >= 0.98


def test_quantize_leaves_the_root_logger_as_it_found_it(sample_onnx_fp32, sample_card, tmp_path):
    """ORT's quantizer is quieted for the call only: afterwards the process's warnings still show."""
    import logging

    from toolkit.data import load_sample

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        quantize(sample_onnx_fp32, sample_card, tmp_path / "q.int8.onnx", load_sample("train"), calib_size=32)
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)
