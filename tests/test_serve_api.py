"""The real server on a loopback port: tritonclient (unchanged) for v2, /predict, /evaluate, /metrics, limits.

Every answer is compared with the same Runner offline (or with toolkit's offline predict/evaluate).
"""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from support.serve import SlowRunner, png_bytes, running_server, wait_for
from toolkit.evaluate import evaluate, predict, softmax
from toolkit.preprocess import preprocess

MODEL = "digits"


@pytest.fixture(scope="module")
def runner(sample_onnx_runner):
    return sample_onnx_runner


@pytest.fixture(scope="module")
def server(runner):
    with running_server(runner, max_batch_size=16) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def triton(base):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits(sample_test):
    return sample_test.images[:64], sample_test.labels[:64]


# --- Open Inference Protocol through the official client ------------------------------------------

def test_health_metadata_config_index(triton, runner):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert meta["outputs"][0]["shape"] == [-1, 10]
    config = triton.get_model_config(MODEL)
    assert config["max_batch_size"] == 16
    card = json.loads(config["parameters"]["toolkit.card"]["string_value"])
    assert card["class_names"] == list(runner.card.class_names)
    index = triton.get_model_repository_index()
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]  # Triton 2.51 omits an empty reason
    assert "classification" in triton.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_runner(triton, runner, digits, binary):
    import tritonclient.http as httpclient

    batch = preprocess(digits[0][:5], runner.card)
    expected = runner(batch)
    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = triton.infer(MODEL, [inp], outputs=wanted)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    # no outputs named: the client asks for binary outputs of everything
    result = triton.infer(MODEL, [inp], request_id="abc")
    assert result.get_response()["id"] == "abc"
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(triton, runner, digits, binary):
    import tritonclient.http as httpclient

    batch = preprocess(digits[0][:3], runner.card)
    logits = runner(batch)
    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)
    got = triton.infer(MODEL, [inp], outputs=[out]).as_numpy("logits")
    assert got.shape == (3, 3)
    for row, strings in zip(logits, got):
        order = np.argsort(-row)[:3]
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in strings]
        assert [int(p[1]) for p in parsed] == order.tolist()
        assert [p[2] for p in parsed] == [runner.card.class_names[i] for i in order]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[order], atol=1e-5)


def test_v2_errors_name_what_is_expected(triton, base, runner):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    wrong = np.zeros((1, 3, 28, 28), np.float32)
    inp = httpclient.InferInput("input", list(wrong.shape), "FP32")
    inp.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException, match=r"Expected \[-1,3,32,32\], got \[1,3,28,28\]") as err:
        triton.infer(MODEL, [inp])
    assert err.value.status() == "400"
    ints = httpclient.InferInput("input", [1, 3, 32, 32], "INT64")
    ints.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.int64))
    with pytest.raises(InferenceServerException,
                       match="data-type is 'INT64', but model 'digits' expects 'FP32'") as err:
        triton.infer(MODEL, [ints])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model") as err:
        triton.get_model_metadata("nope")
    assert err.value.status() == "404"
    url = f"{base}/v2/models/{MODEL}/infer"
    for body, headers in [(b"{not json", {}), (b'{"inputs": []}', {}),
                          (b'{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32",'
                           b'"parameters":{"binary_data_size":12288}}]}', {}),
                          (b'{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32",'
                           b'"data":[1,2]}]}', {}),
                          (b"{}" + b"x" * 10, {"Inference-Header-Content-Length": "99"}),
                          (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP99","data":[1]}]}', {})]:
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == 400, (body, response.text)
        assert "error" in response.json()
    assert httpx.post(f"{base}/v2/models/nope/infer", content=b"{}").status_code == 404
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/7").status_code == 404


# --- /predict ---------------------------------------------------------------------------------------

def test_predict_multipart_and_raw_body_match_offline_predict(base, runner, digits, tmp_path):
    images = digits[0][:4]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"d{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    offline = predict(runner, [str(p) for p in paths], top_k=3)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    files.insert(2, ("files", ("bad.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")))
    response = httpx.post(f"{base}/predict?top_k=3", files=files)
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert got[2]["input"] == "bad.png" and got[2]["status"] in (400, 415) and "error" in got[2]
    del got[2]
    for mine, ref in zip(got, offline):
        assert [t["index"] for t in mine["top"]] == [t["index"] for t in ref["top"]]
        np.testing.assert_allclose([t["probability"] for t in mine["top"]],
                                   [t["probability"] for t in ref["top"]], atol=1e-5)
    raw = httpx.post(f"{base}/predict", content=paths[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200
    assert raw.json()["predictions"][0]["top"][0]["index"] == offline[0]["top"][0]["index"]
    assert len(raw.json()["predictions"][0]["top"]) == 5


@pytest.mark.slow
def test_many_concurrent_distinct_images_each_get_their_own_answer(base, runner, sample_test):
    images = sample_test.images[:64]
    expected = softmax(runner(preprocess(images, runner.card)))
    bodies = [png_bytes(image) for image in images]
    client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16))

    def ask(i: int) -> list[float]:
        response = client.post(f"{base}/predict?top_k=10", content=bodies[i])
        assert response.status_code == 200, response.text
        top = response.json()["predictions"][0]["top"]
        return [p for _, p in sorted((t["index"], t["probability"]) for t in top)]

    with client, ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, range(len(images))))
    np.testing.assert_allclose(np.array(answers), expected, atol=1e-5)


# --- /metrics -------------------------------------------------------------------------------------

def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_count_requests_images_and_failures(base, digits):
    before = httpx.get(f"{base}/metrics").text
    body = png_bytes(digits[0][0])
    for _ in range(3):
        assert httpx.post(f"{base}/predict", content=body).status_code == 200
    two = [("files", ("a.png", body)), ("files", ("b.png", body))]
    assert httpx.post(f"{base}/predict", files=two).status_code == 200
    assert httpx.post(f"{base}/predict", content=b"not an image").status_code == 415
    after = httpx.get(f"{base}/metrics").text
    delta = {name: _metric(after, name) - _metric(before, name)
             for name in ("nv_inference_request_success", "nv_inference_count")}
    assert delta == {"nv_inference_request_success": 4, "nv_inference_count": 5}
    assert _metric(after, "nv_inference_request_failure", reason="OTHER") - \
        _metric(before, "nv_inference_request_failure", reason="OTHER") == 1
    for name in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                 "nv_inference_request_duration_us", "nv_inference_exec_count"):
        assert _metric(after, name) > _metric(before, name)
    assert _metric(after, "nv_inference_pending_request_count") == 0
    assert "# TYPE toolkit_inference_batch_size histogram" in after


# --- /evaluate ------------------------------------------------------------------------------------

def test_evaluate_matches_offline_eval(base, runner, sample_test):
    from toolkit.data import Dataset

    images, labels = sample_test.images[:40], sample_test.labels[:40].copy()
    labels[::3] = (labels[::3] + 1) % 10  # wrong labels, so every metric is non-trivial
    offline = json.loads(json.dumps(evaluate(runner, Dataset("upload", sample_test.class_names, labels,
                                                             images)).to_dict()))
    assert 0.5 < offline["accuracy"] < 0.8
    files = [("files", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(images)]
    data = {"labels": json.dumps([sample_test.class_names[int(label)] for label in labels])}
    got = httpx.post(f"{base}/evaluate", files=files, data=data, timeout=60)
    assert got.status_code == 200, got.text
    got = got.json()
    for key in ("accuracy", "top5", "macro", "micro", "weighted", "per_class", "confusion_matrix",
                "num_samples"):
        assert got[key] == offline[key], key
    assert {"images_per_second", "backend", "model"} <= set(got)

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (img, label) in enumerate(zip(images, labels)):
            zf.writestr(f"set/{sample_test.class_names[int(label)]}/{i}.png", png_bytes(img))
    got_zip = httpx.post(f"{base}/evaluate", content=archive.getvalue(),
                         headers={"Content-Type": "application/zip"}, timeout=60)
    assert got_zip.status_code == 200, got_zip.text
    assert got_zip.json()["confusion_matrix"] == offline["confusion_matrix"]
    # labels that do not fit, and a bad image, are the client's mistakes
    bad = httpx.post(f"{base}/evaluate", files=files[:2], data={"labels": json.dumps(["0"])})
    assert bad.status_code == 400 and "labels" in bad.json()["error"]
    bad = httpx.post(f"{base}/evaluate", files=[("files", ("x.png", b"junk"))], data={"labels": "3"})
    assert bad.status_code == 415


# --- limits: never a 500 for a client's mistake ---------------------------------------------------

@pytest.mark.slow
def test_limits_body_pixels_bad_images_and_content_types(base, digits):
    from PIL import Image

    big = httpx.post(f"{base}/predict", content=b"\0" * (16 * 1024 * 1024 + 1))
    assert big.status_code == 413 and "--max-body-mb" in big.json()["error"]

    def chunks():
        for _ in range(17):
            yield b"\0" * (1024 * 1024)

    assert httpx.post(f"{base}/predict", content=chunks()).status_code == 413
    buffer = io.BytesIO()
    Image.new("L", (8000, 7000)).save(buffer, "PNG")  # 56 MP, a few tens of kB
    huge = httpx.post(f"{base}/predict", content=buffer.getvalue())
    assert huge.status_code == 413 and "pixels" in huge.json()["error"]
    assert httpx.post(f"{base}/predict", content=b"GIF89a nonsense").status_code in (400, 415)
    truncated = png_bytes(digits[0][0])[:60]
    assert httpx.post(f"{base}/predict", content=truncated).status_code in (400, 415)
    assert httpx.post(f"{base}/predict", content=b"").status_code == 400
    assert httpx.post(f"{base}/predict", json={"a": 1}).status_code == 415
    assert httpx.post(f"{base}/predict", content=b"--x\r\nbroken", headers={
        "Content-Type": "multipart/form-data; boundary=zzz"}).status_code == 400
    assert httpx.post(f"{base}/predict?top_k=0", content=png_bytes(digits[0][0])).status_code == 400
    assert httpx.post(f"{base}/predict?top_k=abc", content=png_bytes(digits[0][0])).status_code == 400
    assert httpx.get(f"{base}/nowhere").status_code == 404
    # 16-bit, palette and RGBA images are converted, not refused
    for mode in ("I;16", "P", "RGBA", "LA", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
        assert httpx.post(f"{base}/predict", content=buffer.getvalue()).status_code == 200, mode
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200  # still serving


@pytest.mark.slow
def test_api_key(runner, digits):
    body = png_bytes(digits[0][0])
    with running_server(runner, api_key="s3cret") as (base, _):
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        for method, path in [("POST", "/predict"), ("GET", "/metrics"), ("GET", f"/v2/models/{MODEL}"),
                             ("POST", f"/v2/models/{MODEL}/infer"), ("POST", "/evaluate")]:
            response = httpx.request(method, f"{base}{path}", content=body)
            assert response.status_code == 401, path
            assert httpx.request(method, f"{base}{path}", content=body,
                                 headers={"Authorization": "Bearer wrong"}).status_code == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{base}/predict", content=body, headers=bearer).status_code == 200
        assert httpx.post(f"{base}/predict", content=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{base}/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


@pytest.mark.slow
def test_not_ready_until_warm_then_queue_full_503_and_timeout_504(runner, digits):
    body = png_bytes(digits[0][0])
    slow = SlowRunner(runner, 0.3)
    slow.gate.clear()  # warm-up blocks until the gate opens
    with running_server(slow, wait_ready=False, max_queue=2, timeout_s=1.2, max_batch_size=1) as (base, _):
        assert httpx.get(f"{base}/v2/health/ready").status_code == 503
        assert httpx.get(f"{base}/v2/models/{MODEL}/ready").status_code == 503
        assert httpx.post(f"{base}/predict", content=body).status_code == 503
        assert httpx.post(f"{base}/v2/repository/index").json()[0]["state"] == "LOADING"
        slow.gate.set()
        wait_for(f"{base}/v2/health/ready")

        def ask(_: int) -> httpx.Response:
            return httpx.post(f"{base}/predict", content=body, timeout=30)

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = [r.status_code for r in pool.map(ask, range(8))]
            full = [r for r in pool.map(ask, range(8)) if r.status_code == 503]
        # one runs, two wait; the rest are refused at once; those waiting > 1.2 s time out
        assert statuses.count(200) >= 2 and statuses.count(503) >= 3, statuses
        assert full and full[0].headers["Retry-After"] == "1" and "--max-queue" in full[0].json()["error"]
        assert set(statuses) <= {200, 503, 504}

    slow.delay_s = 0.6
    with running_server(slow, wait_ready=True, timeout_s=0.2, max_batch_size=1) as (base, _):
        response = httpx.post(f"{base}/predict", content=body, timeout=30)
        assert response.status_code == 504 and "--timeout-s" in response.json()["error"]
        assert httpx.get(f"{base}/v2/health/live").status_code == 200


def test_the_hot_path_and_the_fastapi_routes_answer_alike(base, runner, digits):
    """serve.hotpath answers raw-body /predict and v2 infer below FastAPI; a query string it does not
    handle (an extra parameter) sends the same request through FastAPI: both answers must be equal."""
    image = png_bytes(digits[0][0])
    hot = httpx.post(f"{base}/predict?top_k=3", content=image, headers={"X-Filename": "a.png"})
    routed = httpx.post(f"{base}/predict?top_k=3&via=fastapi", content=image, headers={"X-Filename": "a.png"})
    assert hot.status_code == routed.status_code == 200 and hot.json() == routed.json()
    assert hot.json()["predictions"][0]["input"] == "a.png" and len(hot.json()["predictions"][0]["top"]) == 3
    for query in ("top_k=0", "top_k=0&via=fastapi"):  # the same error both ways
        answer = httpx.post(f"{base}/predict?{query}", content=image)
        assert answer.status_code == 400 and "top_k must be at least 1" in answer.json()["error"]
    batch = preprocess(digits[0][:2], runner.card)
    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}
    hot = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=body)
    routed = httpx.post(f"{base}/v2/models/{MODEL}/infer?via=fastapi", json=body)
    assert hot.status_code == routed.status_code == 200 and hot.json() == routed.json()
    for suffix in ("", "?via=fastapi"):  # an unknown model: 404 both ways
        assert httpx.post(f"{base}/v2/models/nope/infer{suffix}", json=body).status_code == 404
