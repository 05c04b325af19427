"""The v2 gRPC endpoint (Triton's GRPCInferenceService) through tritonclient.grpc, unchanged.

One server process answers HTTP and gRPC: the same batcher, statistics, API key and drain. Every
answer is compared with the HTTP endpoint's or with the Runner called offline.
"""

from __future__ import annotations

import numpy as np
import pytest

from support.serve import free_port, running_server
from toolkit.preprocess import preprocess

grpcclient = pytest.importorskip("tritonclient.grpc")
MODEL = "digits"
MAX_BATCH = 8


@pytest.fixture(scope="module")
def runner(sample_onnx_runner):
    return sample_onnx_runner


@pytest.fixture(scope="module")
def server(runner):
    port = free_port()
    with running_server(runner, max_batch_size=MAX_BATCH, grpc_port=port) as (base, state):
        yield base, state, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(server[2])
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server[0].removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def batch(runner, sample_test):
    return preprocess(sample_test.images[:5], runner.card)


def _input(array: np.ndarray):
    inp = grpcclient.InferInput("input", list(array.shape), "FP32")
    inp.set_data_from_numpy(array)
    return inp


def _error(call, *args, **kwargs):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        call(*args, **kwargs)
    return err.value


def test_health_and_metadata_match_http(client, http):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata(as_json=True)["extensions"] == http.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert meta["platform"] == http.get_model_metadata(MODEL)["platform"]


def test_config_is_the_http_config(client, http):
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    over_grpc = client.get_model_config(MODEL).config
    over_http = json_format.ParseDict(http.get_model_config(MODEL), model_config_pb2.ModelConfig())
    assert over_grpc == over_http
    assert over_grpc.max_batch_size == MAX_BATCH
    assert "class_names" in over_grpc.parameters["toolkit.card"].string_value


def test_repository_index(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]


@pytest.mark.parametrize("action", ["load_model", "unload_model"])
def test_load_unload_unavailable(client, action):
    err = _error(getattr(client, action), MODEL)
    assert err.status() == "StatusCode.UNAVAILABLE"
    assert err.message() == "explicit model load / unload is not allowed if polling is enabled"


def test_infer_raw_matches_runner_and_http(client, http, runner, batch):
    expected = runner(batch)
    result = client.infer(MODEL, [_input(batch)], request_id="r1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r1"
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    np.testing.assert_array_equal(result.as_numpy("logits"), http.infer(MODEL, [inp]).as_numpy("logits"))


def test_infer_typed_contents(server, runner, batch):
    """A client that sends `contents.fp32_contents` (no raw bytes), as KServe's older clients do."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.reshape(-1).tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(server[2]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(got, runner(batch), rtol=1e-5, atol=1e-5)


def test_classification_output(client, runner, batch):
    out = grpcclient.InferRequestedOutput("logits", class_count=3)
    strings = client.infer(MODEL, [_input(batch[:2])], outputs=[out]).as_numpy("logits")
    assert strings.shape == (2, 3)
    order = np.argsort(-runner(batch[:2]), axis=1)[:, :3]
    assert [[int(s.decode().split(":")[1]) for s in row] for row in strings] == order.tolist()


def test_errors_are_triton_statuses_and_messages(client, batch):
    err = _error(client.infer, MODEL, [_input(np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32))])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == f"inference request batch-size must be <= {MAX_BATCH} for '{MODEL}'"
    err = _error(client.infer, MODEL, [_input(batch[0])])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Expected [-1,3,32,32], got [3,32,32]" in err.message()
    err = _error(client.get_model_metadata, "nope")
    assert err.status() == "StatusCode.NOT_FOUND"
    wrong = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
    wrong._raw_content = b"\0" * 12  # a client bug: bytes that do not fit the shape
    err = _error(client.infer, MODEL, [wrong])
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "needs 12288 bytes" in err.message()


def test_nan_is_answered(client, runner):
    batch = np.full((1, 3, 32, 32), np.nan, np.float32)
    assert client.infer(MODEL, [_input(batch)]).as_numpy("logits").shape == (1, 10)


def test_statistics_shared_with_http(client, http, batch):
    before = http.get_inference_statistics(MODEL)["model_stats"][0]["inference_stats"]["success"]["count"]
    client.infer(MODEL, [_input(batch)])
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == before + 1
    assert "response_stats" in stats and stats["memory_usage"][0]["type"] == "CPU"
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [m["name"] for m in everything] == [MODEL]


def test_settings(client):
    assert client.get_log_settings(as_json=True)["settings"]["log_info"] == {"bool_param": True}
    trace = client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_rate"] == {"value": ["1000"]} and trace["trace_level"] == {"value": ["OFF"]}
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    err = _error(client.register_cuda_shared_memory, "gpu", b"", 0, 16)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"


def test_system_shared_memory(client, runner, batch):
    import tritonclient.utils.shared_memory as shm

    expected = runner(batch)
    in_handle = shm.create_shared_memory_region("g_in", "/toolkit_grpc_in", batch.nbytes)
    out_handle = shm.create_shared_memory_region("g_out", "/toolkit_grpc_out", expected.nbytes)
    try:
        shm.set_shared_memory_region(in_handle, [batch])
        client.register_system_shared_memory("g_in", "/toolkit_grpc_in", batch.nbytes)
        client.register_system_shared_memory("g_out", "/toolkit_grpc_out", expected.nbytes)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert sorted(status) == ["g_in", "g_out"]
        inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_shared_memory("g_in", batch.nbytes)
        out = grpcclient.InferRequestedOutput("logits")
        out.set_shared_memory("g_out", expected.nbytes)
        client.infer(MODEL, [inp], outputs=[out])
        got = shm.get_contents_as_numpy(out_handle, np.float32, list(expected.shape))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    assert client.get_system_shared_memory_status(as_json=True) == {}


def test_draining_answers_unavailable(client, server, batch):
    state = server[1]
    state.draining = True
    try:
        err = _error(client.infer, MODEL, [_input(batch)])
        assert err.status() == "StatusCode.UNAVAILABLE" and "shutting down" in err.message()
        assert not client.is_server_ready()
    finally:
        state.draining = False


@pytest.mark.slow
def test_api_key(runner, batch):
    port = free_port()
    with running_server(runner, api_key="s3cret", grpc_port=port), \
            grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_live()  # health stays open, as over HTTP
        err = _error(client.infer, MODEL, [_input(batch)])
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        err = _error(client.get_model_metadata, MODEL, headers={"authorization": "Bearer wrong"})
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        for headers in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
            result = client.infer(MODEL, [_input(batch)], headers=headers)
            assert result.as_numpy("logits").shape == (len(batch), 10)


def test_grpc_port_in_use_stops_the_server_with_the_reason(runner):
    import socket

    from serve.config import ServeConfig
    from serve.errors import ServeStartupError
    from serve.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServeConfig(name=MODEL, port=free_port(), grpc_port=port, warmup=False)
        with pytest.raises(ServeStartupError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            serve(runner, config, log_level="critical")
