"""`toolkit serve --model-repository` as real processes (the default --workers 2), driven by the official
tritonclient.http and tritonclient.grpc, unchanged: two models exported into one repository (fp32 and
int8 of the sample model) beside one that cannot load; explicit load and unload; 32 concurrent clients
whose every answer equals the offline runner of its model; per-model statistics; an unload in the middle
of a load test that loses no accepted request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from support.serve import free_port
from test_serve_workers import Server

pytestmark = pytest.mark.slow
FP32, INT8 = "digits", "digits_int8"
http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the skip above


@pytest.fixture(scope="module")
def repository(tmp_path_factory, sample_onnx_fp32, sample_onnx_int8, sample_card):
    from export.triton import export

    root = tmp_path_factory.mktemp("repository")
    export(sample_onnx_fp32, root, sample_card, name=FP32, max_batch_size=8)
    export(sample_onnx_int8, root, sample_card, name=INT8, max_batch_size=8)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX file")
    (root / "broken" / "config.pbtxt").write_text('name: "broken"\nmax_batch_size: 4\n', "utf-8")
    return root


@pytest.fixture(scope="module")
def offline(sample_onnx_fp32, sample_onnx_int8):
    from toolkit.runtime.registry import open_model

    with open_model(sample_onnx_fp32) as fp32, open_model(sample_onnx_int8) as int8:
        yield {FP32: fp32, INT8: int8}


@pytest.fixture(scope="module")
def server(repository):
    import sys

    port, grpc_port = free_port(), free_port()
    server = Server([sys.executable, "-m", "toolkit.cli", "serve", "--model-repository", str(repository),
                     "--model-control-mode", "explicit", "--load-model", FP32, "--port", str(port),
                     "--grpc-port", str(grpc_port), "--workers", "2"], port)
    server.grpc = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(sample_test, offline):
    from toolkit.preprocess import preprocess

    return preprocess(sample_test.images[:64], offline[FP32].card)


def _http(server) -> http.InferenceServerClient:
    return http.InferenceServerClient(server.base.removeprefix("http://"))


def _infer_http(client, model: str, batch: np.ndarray) -> np.ndarray:
    tensor = http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor]).as_numpy("logits")


def _infer_grpc(client, model: str, batch: np.ndarray) -> np.ndarray:
    tensor = grpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor]).as_numpy("logits")


def test_index_load_and_a_model_that_cannot_load(server):
    client = _http(server)
    assert client.is_server_ready()
    assert client.get_model_repository_index() == [
        {"name": "broken"}, {"name": FP32, "version": "1", "state": "READY"}, {"name": INT8}]
    client.load_model(INT8)
    assert client.is_model_ready(INT8) and client.get_model_metadata(INT8)["versions"] == ["1"]
    with grpc.InferenceServerClient(server.grpc) as gclient, pytest.raises(InferenceServerException) as err:
        gclient.load_model("broken")
    message = err.value.message()
    assert message.startswith("load failed for model 'broken': version 1 is at UNAVAILABLE state: ")
    assert "not a readable ONNX file" in message
    index = {(row["name"], row.get("version")): row for row in client.get_model_repository_index()}
    assert index[("broken", "1")]["state"] == "UNAVAILABLE"
    assert "not a readable ONNX file" in index[("broken", "1")]["reason"]
    assert index[(INT8, "1")]["state"] == "READY" and client.is_model_ready(FP32)  # the others keep serving
    assert _infer_http(client, INT8, np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    assert not client.is_server_ready()  # as Triton: a model that failed its load makes the server unready
    client.unload_model("broken")
    assert client.is_server_ready()
    with pytest.raises(InferenceServerException, match="failed to poll from model repository"):
        client.load_model("nope")


def test_32_clients_over_http_and_grpc_equal_the_offline_runners_with_per_model_statistics(
        server, offline, images):
    client = _http(server)
    if not client.is_model_ready(INT8):
        client.load_model(INT8)
    before = {m: client.get_inference_statistics(m)["model_stats"][0]["inference_stats"]["success"]["count"]
              for m in (FP32, INT8)}
    jobs = [(i, (FP32, INT8)[i % 2], "grpc" if i % 4 >= 2 else "http") for i in range(32)]

    def run(job: tuple[int, str, str]) -> tuple[str, np.ndarray, np.ndarray]:
        i, model, transport = job
        batch = images[2 * i:2 * i + 2] if i < 32 else images[:2]
        if transport == "http":
            with http.InferenceServerClient(server.base.removeprefix("http://")) as own:
                return model, batch, np.vstack([_infer_http(own, model, batch) for _ in range(4)])
        with grpc.InferenceServerClient(server.grpc) as own:
            return model, batch, np.vstack([_infer_grpc(own, model, batch) for _ in range(4)])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for model, batch, logits in results:
        expected = np.vstack([offline[model](batch)] * 4)
        np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg=model)
    stats = client.get_inference_statistics()["model_stats"]
    by_model = {entry["name"]: entry for entry in stats}
    assert set(by_model) == {FP32, INT8}
    for model in (FP32, INT8):
        success = by_model[model]["inference_stats"]["success"]["count"]
        assert success - before[model] == 16 * 4  # each model's own count, summed over both workers
    with grpc.InferenceServerClient(server.grpc) as gclient:
        answer = gclient.get_inference_statistics(INT8, as_json=True)["model_stats"][0]
    assert answer["name"] == INT8 and int(answer["inference_stats"]["success"]["count"]) >= 64
    metrics = httpx.get(f"{server.base}/metrics").text
    assert f'nv_inference_request_success{{model="{INT8}",version="1"}}' in metrics


def test_an_unload_during_a_load_test_loses_no_accepted_request(server, offline, images):
    client = _http(server)
    if not client.is_model_ready(INT8):
        client.load_model(INT8)
    expected = offline[INT8](images[:2])
    results: list[tuple[float, str]] = []  # (when it was answered, "ok" | the refusal)
    stop = threading.Event()

    def hammer() -> None:
        with http.InferenceServerClient(server.base.removeprefix("http://")) as own:
            while not stop.is_set():
                try:
                    logits = _infer_http(own, INT8, images[:2])
                    np.testing.assert_allclose(logits, expected, atol=1e-4)
                    results.append((time.monotonic(), "ok"))
                except InferenceServerException as exc:
                    results.append((time.monotonic(), f"{exc.status()} {exc.message()}"))

    threads = [threading.Thread(target=hammer) for _ in range(32)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    began = time.monotonic()
    client.unload_model(INT8)
    unloaded = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)
    refusals = [text for _, text in results if text != "ok"]
    assert sum(text == "ok" for _, text in results) > 32
    # every refusal is the model not being there (never a request that was accepted, then failed)
    assert all(text.startswith(("503", "404")) and ("not ready (unloading)" in text or
                                                   "has no available versions" in text)
               for text in refusals), refusals[:5]
    assert all(when >= began for when, text in results if text != "ok")
    assert any(when > unloaded for when, text in results if text != "ok")
    assert not client.is_model_ready(INT8) and client.is_server_ready()
    assert {"name": INT8, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in \
        client.get_model_repository_index()
