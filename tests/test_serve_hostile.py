"""Hostile requests against the real server: each builds its attack itself and asserts the status, an
`{"error": ...}` body, no traceback in the server log, and a server that still answers.

Covers issue 9's server items: huge and slow request heads, slow bodies, too many connections,
shapes and JSON built to overflow or recurse, `outputs` of the wrong type, zip bombs (by the bytes
they actually inflate to), the API key on `/ready` paths, decoder failures, a 500 that keeps the
connection usable, and a model that cannot be served stopping the server with its reason.
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from support.serve import SlowRunner, free_port, png_bytes, running_server, zip_with_declared_size

MODEL = "digits"
ZIP = {"Content-Type": "application/zip"}
MAGIC = 12345.0  # an input whose first value is this makes the model itself fail (a server-side bug)


class ExplodingRunner(SlowRunner):
    """The sample runner, failing on MAGIC inputs (a stand-in for a backend bug) or always."""

    always = False

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.always:
            raise ValueError("the model wants 4 input channels, the card says 3")
        if batch.flat[0] == MAGIC:
            raise RuntimeError("backend exploded")
        return super()._infer(batch)


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [self.format(r) for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.fixture(scope="module")
def server(sample_onnx_runner) -> Iterator[tuple[str, int]]:
    runner = ExplodingRunner(sample_onnx_runner, 0.0)
    with running_server(runner, max_body_mb=1.0, header_timeout_s=1.0, body_timeout_s=1.0,
                        max_header_kb=16) as (base, _):
        yield base, int(base.rsplit(":", 1)[1])


@pytest.fixture
def base(server) -> Iterator[str]:
    """The server's URL; afterwards: no traceback was logged and the server still answers ready."""
    handler = LogRecords()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "toolkit.serve")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield server[0]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert httpx.get(f"{server[0]}/v2/health/ready").status_code == 200
    assert handler.tracebacks() == []


def _error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message and "Traceback" not in message
    return message


# --- raw sockets: what an HTTP client library would never send ------------------------------------

def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a response ({data!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.mark.parametrize("complete", [False, True])
def test_oversized_request_head_is_431_and_never_read_whole(server, base, complete):
    """Incomplete (still arriving) and complete heads alike: a parser alone lets a complete one through."""
    with _connect(server[1]) as sock:
        end = b"\r\n\r\n" if complete else b""
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024) + end)
        status, headers, body = _read_response(sock)
    assert status == 431 and headers["connection"] == "close"
    assert "headers are over the limit of 16 KB" in json.loads(body)["error"]


def test_a_small_head_with_a_large_body_in_the_same_read_is_not_431(server, base):
    """The head cap counts bytes before the parser sees them; body bytes in the same read are not head."""
    body = b"\x00" * (200 * 1024)  # over the 16 KB head cap, well under the 1 MB body limit
    with _connect(server[1]) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, payload = _read_response(sock)
    assert status == 415 and "not a recognised image" in json.loads(payload)["predictions"][0]["error"]


@pytest.mark.slow
def test_request_head_stalled_or_trickled_is_408_and_closed(server, base):
    with _connect(server[1]) as sock:  # trickles: every byte resets uvicorn's keep-alive timer, not ours
        began = time.monotonic()
        for piece in (b"GET /v2/health/live HT", b"TP/1.1\r\n", b"Host: x\r\n"):
            sock.sendall(piece)
            time.sleep(0.4)
        status, headers, body = _read_response(sock)
        assert status == 408 and headers["connection"] == "close" and "headers" in json.loads(body)["error"]
        assert time.monotonic() - began < 3
        assert sock.recv(10) == b""  # closed
    with _connect(server[1]) as sock:  # connected and silent: closed without an answer
        sock.settimeout(5)
        assert sock.recv(10) == b""


@pytest.mark.slow
def test_request_body_stalled_is_408_and_closed(server, base):
    with _connect(server[1]) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                     .encode() + b'{"inputs": [')
        status, headers, body = _read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert "body not received within 1 s" in json.loads(body)["error"]


def test_expect_100_continue_is_answered_before_the_body_is_sent(server, base):
    """The response's head waits for its body (one write per answer), but an interim 100 never waits."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": [0.5] * 3072}]}).encode()
    with _connect(server[1]) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        sock.settimeout(2)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, payload = _read_response(sock)
    assert status == 200 and json.loads(payload)["outputs"][0]["shape"] == [1, 10]


def test_head_and_body_go_out_in_one_write_and_a_held_head_is_never_lost():
    from serve.connection import _HeadWithBody

    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

    transport = Recording()
    writer = _HeadWithBody(transport)  # type: ignore[arg-type]
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]  # the head waits, the 100 did not
    writer.write(b"{}")
    writer.write(b"more")
    assert transport.writes[1:] == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]
    assert writer.is_closing() is False  # everything else is the transport's
    held = _HeadWithBody(transport)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    held.close()  # a response abandoned after its head: the head still goes out before the close
    assert transport.writes[-1] == b"HTTP/1.1 500 Internal Server Error\r\n\r\n" and transport.closed


@pytest.mark.slow
def test_connections_beyond_the_limit_get_503_and_are_closed(sample_onnx_runner):
    with running_server(sample_onnx_runner, max_connections=3) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        held = [_connect(port) for _ in range(3)]
        time.sleep(0.2)
        with _connect(port) as extra:
            status, headers, body = _read_response(extra)
        assert status == 503 and headers["connection"] == "close"
        assert "too many open connections" in json.loads(body)["error"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200


# --- request bodies built to overflow, recurse or confuse ----------------------------------------

def _infer_body(shape: object, data: object = None, **extra: object) -> bytes:
    tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": [0.5] if data is None else data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


HOSTILE_INFER = {
    "dim 10**20": _infer_body([10**20]),
    "shape 2**62 x 4": _infer_body([2**62, 4]),
    "shape 2**20 cubed": _infer_body([2**20, 2**20, 2**20]),
    "100 dims": _infer_body([1] * 100),
    "bool shape": _infer_body([True, 3, 32, 32]),
    "header nested 100000 deep": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "data nested 100000 deep": _infer_body([1]).replace(b"[0.5]", b"[" * 100_000 + b"0.5" + b"]" * 100_000),
    "data nested deeper than shape": _infer_body([1], [[[[[[0.5]]]]]]),
    "int of 5000 digits": _infer_body([1]).replace(b"0.5", b"7" * 5000),
    "data of strings": _infer_body([2], ["a", "b"]),
    "data of objects": _infer_body([1], [{"a": 1}]),
    "outputs a number": _infer_body([1, 3, 32, 32], [0.5] * 3072, outputs=5),
    "outputs true": _infer_body([1, 3, 32, 32], [0.5] * 3072, outputs=True),
    "outputs a string": _infer_body([1, 3, 32, 32], [0.5] * 3072, outputs="logits"),
    "outputs an object": _infer_body([1, 3, 32, 32], [0.5] * 3072, outputs={"name": "logits"}),
    "id an object": _infer_body([1, 3, 32, 32], [0.5] * 3072, id={"a": [1]}),
    "parameters a list": _infer_body([1, 3, 32, 32], [0.5] * 3072, parameters=[1]),
    "binary size bool": json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                                "parameters": {"binary_data_size": True}}]}).encode() + b"\0",
    "zero batch": _infer_body([0, 3, 32, 32], []),
}


@pytest.mark.parametrize("case", list(HOSTILE_INFER))
def test_hostile_infer_bodies_are_400(base, case):
    _error(httpx.post(f"{base}/v2/models/{MODEL}/infer", content=HOSTILE_INFER[case]), 400)


@pytest.mark.parametrize("shape", [[2**62, 4], [2**20, 2**20, 2**20], [2**40, 0, 2**40]])
def test_hostile_binary_shapes_are_400(base, shape):
    header = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    response = httpx.post(f"{base}/v2/models/{MODEL}/infer", content=header + b"\0" * 16,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    _error(response, 400)


@pytest.mark.parametrize("labels", ["[" * 100_000 + "]" * 100_000, json.dumps([[["cat"]]]),
                                    json.dumps([10**30]), "9" * 5000, json.dumps([True])])
def test_hostile_evaluate_labels_are_400(base, sample_test, labels):
    files = [("files", ("a.png", png_bytes(sample_test.images[0]), "image/png"))]
    _error(httpx.post(f"{base}/evaluate", files=files, data={"labels": labels}), 400)


def test_a_500_keeps_the_keep_alive_connection_usable(server):
    good = _infer_body([1, 3, 32, 32], [0.5] * 3072)
    bad = _infer_body([1, 3, 32, 32], [MAGIC] + [0.5] * 3071)
    with _connect(server[1]) as sock:
        answers = []
        for body in (good, bad, good, bad, good):
            sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                         f"Content-Length: {len(body)}\r\n"
                         f"Content-Type: application/json\r\n\r\n".encode() + body)
            status, headers, payload = _read_response(sock)
            answers.append(status)
            assert "close" not in headers.get("connection", "")  # the same connection goes on
            assert "error" in json.loads(payload) if status >= 400 else "outputs" in json.loads(payload)
    assert answers == [200, 500, 200, 500, 200]


# --- /evaluate zips: refused by the bytes they actually inflate to ---------------------------------

@pytest.fixture(scope="module")
def zeros_64mb() -> bytes:
    return bytes(64 * 1024 * 1024)


@pytest.mark.slow
@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_zip_bomb_member_is_refused_by_actual_bytes(base, zeros_64mb, method):
    bomb = zip_with_declared_size("set/cat/a.png", zeros_64mb, method, declared=1000)
    assert len(bomb) < 1024 * 1024  # under the 1 MB body limit: only the inflated size is hostile
    message = _error(httpx.post(f"{base}/evaluate", content=bomb, headers=ZIP, timeout=60), 413)
    assert "expands beyond" in message


def test_zip_of_many_members_is_capped_in_total(base):
    member = bytes(900 * 1024)  # each under the 1 MB member cap; 10 of them over the 8 MB total
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i in range(10):
            archive.writestr(f"set/cat/{i}.png", member)
    _error(httpx.post(f"{base}/evaluate", content=buffer.getvalue(), headers=ZIP, timeout=60), 413)


def test_zip_members_bzip2_and_deflate_still_evaluate(base, sample_test):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(6):
            name = sample_test.class_names[int(sample_test.labels[i])]
            method = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2)[i % 3]
            archive.writestr(zipfile.ZipInfo(f"set/{name}/{i}.png"), png_bytes(sample_test.images[i]),
                             compress_type=method)
    response = httpx.post(f"{base}/evaluate", content=buffer.getvalue(), headers=ZIP, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["num_samples"] == 6
    lzma = io.BytesIO()
    with zipfile.ZipFile(lzma, "w", compression=zipfile.ZIP_LZMA) as archive:
        archive.writestr("set/cat/a.png", png_bytes(sample_test.images[0]))
    _error(httpx.post(f"{base}/evaluate", content=lzma.getvalue(), headers=ZIP), 415)
    broken = bytearray(buffer.getvalue())
    broken[60:70] = b"\xff" * 10  # inside the first member's data: a CRC or stream error, not a 500
    _error(httpx.post(f"{base}/evaluate", content=bytes(broken), headers=ZIP), (400, 415))


# --- images the decoder fails on in its own way -----------------------------------------------------

def test_any_decoder_failure_is_a_4xx(base, monkeypatch, sample_test):
    import serve.inputs

    def broken_decoder(*_: object, **__: object) -> None:
        raise struct.error("unpack requires a buffer of 4 bytes")  # what a Pillow plugin may raise

    monkeypatch.setattr(serve.inputs, "decode_image", broken_decoder)
    message = _error(httpx.post(f"{base}/predict", content=png_bytes(sample_test.images[0])), 400)
    assert "unreadable image" in message


@pytest.mark.parametrize("payload", [
    b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0x4)
    + b"XXXX" + bytes(40),  # a DDS with an unknown FourCC pixel format
    b"BLP2" + struct.pack("<i", 1) + bytes([9, 0, 0, 0]) + struct.pack("<II", 4, 4) + bytes(128),  # bad
])
def test_images_of_odd_formats_are_4xx(base, payload):
    response = httpx.post(f"{base}/predict", content=payload)
    assert 400 <= response.status_code < 500 and "error" in response.json()


# --- the API key on model paths; a model the server cannot run ----------------------------------

@pytest.mark.slow
def test_only_documented_health_endpoints_skip_the_api_key(sample_onnx_runner):
    with running_server(sample_onnx_runner, api_key="s3cret") as (base, _):
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        for path in ("/v2/models/nope/ready", f"/v2/models/{MODEL}/ready",
                     f"/v2/models/{MODEL}/versions/1/ready", "/anything/ready", "/v2/health/ready/",
                     "/nowhere"):
            response = httpx.get(f"{base}{path}")
            assert response.status_code == 401, path
            assert MODEL not in response.text
        keyed = httpx.get(f"{base}/v2/models/{MODEL}/ready", headers={"X-API-Key": "s3cret"})
        assert keyed.status_code == 200


def test_a_model_that_fails_warm_up_stops_the_server_with_the_reason(sample_onnx_runner):
    from serve.config import ServeConfig
    from serve.errors import ServeStartupError
    from serve.server import serve

    runner = ExplodingRunner(sample_onnx_runner, 0.0)
    runner.always = True
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            serve(runner, ServeConfig(name=MODEL, port=free_port()), log_level="critical")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the server stayed up although the model cannot run"
    assert isinstance(outcome.get("error"), ServeStartupError)
    assert "warm-up failed" in str(outcome["error"]) and "4 input channels" in str(outcome["error"])


# --- deflate/bzip2 decompression of Content-Encoding bodies is capped too ---------------------------

def test_gzip_body_bomb_is_413(base):
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    body = compressor.compress(bytes(32 * 1024 * 1024)) + compressor.flush()
    url = f"{base}/v2/models/{MODEL}/infer"
    _error(httpx.post(url, content=body, headers={"Content-Encoding": "gzip"}), 413)
    _error(httpx.post(url, content=bz2.compress(b"{}"), headers={"Content-Encoding": "bzip2"}), 415)
