"""Where a real Triton 2.51 and this server once answered differently (issue 10), request by request.

Each test sends the request Triton was sent (through tritonclient where it has a call for it) and
expects Triton's status code and message. Also: /config and the exported config.pbtxt come from one
builder, statistics carry Triton's fields, and the int8 export runs in onnx's reference evaluator.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from support.serve import running_server
from toolkit.preprocess import preprocess

MODEL = "digits"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def runner(sample_onnx_runner):
    return sample_onnx_runner


@pytest.fixture(scope="module")
def server(runner):
    with running_server(runner, max_batch_size=MAX_BATCH) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    yield client
    client.close()


def _input(array: np.ndarray, binary: bool = True):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(array.shape), "FP32")
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def _triton_error(client, array: np.ndarray):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [_input(array)])
    return err.value


# --- 1. NaN/Inf: Triton does not inspect values -------------------------------------------------------

def test_random_bytes_with_nan_and_inf_are_answered_as_triton_does(client, runner):
    # what perf_analyzer sends by default: random bytes, so some floats are NaN or Inf
    raw = np.random.default_rng(0).integers(0, 256, size=2 * 3 * 32 * 32 * 4, dtype=np.uint8)
    batch = raw.view(np.float32).reshape(2, 3, 32, 32).copy()
    batch[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    result = client.infer(MODEL, [_input(batch)])
    got = result.as_numpy("logits")
    assert got.shape == (2, runner.card.num_classes)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got, runner(batch))  # the model's answer, whatever it is


@pytest.mark.slow
def test_reject_nonfinite_is_opt_in(runner):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with running_server(runner, reject_nonfinite=True) as (base, _):
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        bad = np.zeros((1, 3, 32, 32), np.float32)
        bad[0, 1, 2, 3] = np.nan
        with pytest.raises(InferenceServerException, match="NaN or infinite") as err:
            client.infer(MODEL, [_input(bad)])
        assert err.value.status() == "400"
        assert client.infer(MODEL, [_input(np.zeros_like(bad))]).as_numpy("logits").shape == (1, 10)
        client.close()


# --- 2. statistics for every model --------------------------------------------------------------------

def test_statistics_of_all_models(client, base):
    client.infer(MODEL, [_input(np.zeros((2, 3, 32, 32), np.float32))])
    everything = client.get_inference_statistics()  # tritonclient's default: GET /v2/models/stats
    assert [m["name"] for m in everything["model_stats"]] == [MODEL]
    assert httpx.get(f"{base}/v2/models/stats").status_code == 200
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1
    # 8. Triton's fields: response_stats, memory_usage, and real per-batch-size phase times
    assert stats["response_stats"]["0"]["success"]["count"] == stats["inference_stats"]["success"]["count"]
    assert stats["memory_usage"][0]["type"] == "CPU" and stats["memory_usage"][0]["byte_size"] > 100_000
    for batch in stats["batch_stats"]:
        for phase in ("compute_input", "compute_infer", "compute_output"):
            assert batch[phase]["count"] >= 1 and batch[phase]["ns"] > 0, (batch["batch_size"], phase)
    # the JSON is Triton's message (parses into tritonclient's protobuf without unknown fields)
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    json_format.ParseDict(everything, service_pb2.ModelStatisticsResponse())


# --- 3./4. batch size and shape, with Triton's messages -----------------------------------------------

def test_batch_over_max_batch_size_is_400(client):
    err = _triton_error(client, np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32))
    assert err.status() == "400"
    assert err.message() == f"inference request batch-size must be <= {MAX_BATCH} for '{MODEL}'"


def test_input_without_batch_dim_is_400(client):
    err = _triton_error(client, np.zeros((3, 32, 32), np.float32))
    assert err.status() == "400"
    assert err.message().startswith(f"unexpected shape for input 'input' for model '{MODEL}'. Expected "
                                    "[-1,3,32,32], got [3,32,32]. NOTE: Setting a non-zero max_batch_size")


# --- 5. repository control (model control mode "none") ------------------------------------------------

@pytest.mark.parametrize("action", ["load", "unload"])
def test_load_unload_answer_as_triton_in_mode_none(client, action):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        getattr(client, f"{action}_model")(MODEL)
    assert err.value.status() == "503"
    assert err.value.message() == "explicit model load / unload is not allowed if polling is enabled"
    assert client.is_model_ready(MODEL)


# --- 6. logging, trace settings, shared memory --------------------------------------------------------

def test_logging_settings(client):
    settings = client.get_log_settings()
    assert settings == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                        "log_verbose_level": 0, "log_format": "default"}
    assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert client.get_log_settings()["log_verbose_level"] == 1
    client.update_log_settings({"log_verbose_level": 0})


def test_logging_refuses_unknown_settings(base):
    response = httpx.post(f"{base}/v2/logging", json={"log_colour": True})
    assert response.status_code == 400 and "log_colour" in response.json()["error"]


def test_trace_settings(client):
    assert client.get_trace_settings() == {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                                           "log_frequency": "0", "trace_file": "", "trace_mode": "triton"}
    updated = client.update_trace_settings(MODEL, {"trace_rate": "10"})
    assert updated["trace_rate"] == "10"
    assert client.get_trace_settings(MODEL)["trace_rate"] == "10"
    assert client.get_trace_settings()["trace_rate"] == "1000"  # the global settings are untouched
    assert client.update_trace_settings(MODEL, {"trace_rate": None})["trace_rate"] == "1000"


def test_shared_memory_status_when_empty(client, base):
    assert client.get_system_shared_memory_status() == []
    assert client.get_cuda_shared_memory_status() == []
    response = httpx.post(f"{base}/v2/cudasharedmemory/region/gpu0/register",
                          json={"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 16})
    assert response.status_code == 400 and "system shared memory" in response.json()["error"]


def test_system_shared_memory_inputs_and_outputs(client, runner, sample_test):
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    batch = preprocess(sample_test.images[:3], runner.card)
    expected = runner(batch)
    in_bytes, out_bytes = batch.nbytes, expected.nbytes
    in_handle = shm.create_shared_memory_region("toolkit_in", "/toolkit_test_in", in_bytes)
    out_handle = shm.create_shared_memory_region("toolkit_out", "/toolkit_test_out", out_bytes)
    try:
        shm.set_shared_memory_region(in_handle, [batch])
        client.register_system_shared_memory("toolkit_in", "/toolkit_test_in", in_bytes)
        client.register_system_shared_memory("toolkit_out", "/toolkit_test_out", out_bytes)
        assert sorted(r["name"] for r in client.get_system_shared_memory_status()) == ["toolkit_in",
                                                                                        "toolkit_out"]
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_shared_memory("toolkit_in", in_bytes)
        out = httpclient.InferRequestedOutput("logits", binary_data=True)
        out.set_shared_memory("toolkit_out", out_bytes)
        result = client.infer(MODEL, [inp], outputs=[out])
        # as Triton: the output names no data and no parameters (C++ clients read binary_data_size there)
        assert result.get_output("logits") == {"name": "logits", "datatype": "FP32", "shape": [3, 10]}
        got = shm.get_contents_as_numpy(out_handle, np.float32, list(expected.shape))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        # a region too small for the tensor named in the request is a 400, not a crash
        from tritonclient.utils import InferenceServerException

        small = httpclient.InferInput("input", list(batch.shape), "FP32")
        small.set_shared_memory("toolkit_in", in_bytes - 4)
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [small])
        assert err.value.status() == "400"
        client.unregister_system_shared_memory("toolkit_in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["toolkit_out"]
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    assert client.get_system_shared_memory_status() == []


@pytest.mark.parametrize("body", [{"key": "/../etc/passwd", "byte_size": 8},
                                  {"key": "/toolkit_no_such_region", "byte_size": 8},
                                  {"key": "/x", "byte_size": -1}, [1, 2]])
def test_shared_memory_register_refuses_bad_regions(base, body):
    response = httpx.post(f"{base}/v2/systemsharedmemory/region/bad/register", json=body)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


# --- 8. one source for /config and config.pbtxt -------------------------------------------------------

def test_config_is_the_exported_config(client, runner, server):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import config_text

    state = server[1]
    served = client.get_model_config(MODEL)
    text = config_text(name=MODEL, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH,
                       inp={"name": "input", "dtype": "TYPE_FP32", "shape": [-1, 3, 32, 32]},
                       out={"name": "logits", "dtype": "TYPE_FP32", "shape": [-1, 10]}, dynamic_batching=True,
                       preferred_batch_sizes=None, max_queue_delay_us=int(state.config.max_delay_ms * 1000),
                       instance_count=1, kind="KIND_CPU", card=runner.card)
    exported = json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                         preserving_proto_field_name=True)
    parsed_served = json_format.MessageToDict(json_format.ParseDict(served, model_config_pb2.ModelConfig()),
                                              preserving_proto_field_name=True)
    for filled_on_load in ("backend", "version_policy"):
        parsed_served.pop(filled_on_load)
    parsed_served["dynamic_batching"].pop("default_queue_policy")
    assert parsed_served == exported
    assert "format" not in served["input"][0]  # FORMAT_NONE, as the exported config says
    assert json.loads(served["parameters"]["toolkit.card"]["string_value"])["class_names"] == list(
        runner.card.class_names)


# --- 8. int8 at opset 19: onnx's reference evaluator runs it ------------------------------------------

@pytest.mark.slow
def test_int8_export_runs_in_the_reference_evaluator(sample_model, sample_test, tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from export.pipeline import run_export
    from toolkit.runtime.registry import open_model

    result = run_export(sample_model, "onnx", tmp_path / "model.int8.onnx", precision="int8",
                        calib_dataset="sample", calib_size=64, do_verify=False)
    path = result.path if hasattr(result, "path") else tmp_path / "model.int8.onnx"
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 19
    assert any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    with open_model(path) as ort:
        batch = preprocess(sample_test.images[:8], ort.card)
        expected = ort(batch)
    got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: batch})[0]
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.875
    np.testing.assert_allclose(got, expected, atol=0.25 * float(np.abs(expected).max()))
