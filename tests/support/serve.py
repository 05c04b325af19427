"""Helpers shared by the serve tests: a real uvicorn server on a free loopback port, stand-in runners."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from serve.config import ServeConfig
from serve.server import DrainingServer, uvicorn_config
from toolkit.runtime.base import Runner


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, status: int = 200, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(url, timeout=2).status_code == status:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s")


@contextmanager
def running_server(runner: Runner, wait_ready: bool = True, **options: Any) -> Iterator[tuple[str, Any]]:
    """(base URL, ServerState) of a real uvicorn server serving `runner`; stopped on exit."""
    config = ServeConfig(**{"name": "digits", "port": free_port(), **options})
    uv_config, state = uvicorn_config(runner, config, log_level="warning")
    server = DrainingServer(uv_config, state)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{config.port}"
    try:
        wait_for(f"{base}/v2/health/{'ready' if wait_ready else 'live'}")
        yield base, state
    finally:
        server.should_exit = True
        thread.join(10)


class SlowRunner(Runner):
    """Wraps a runner and sleeps before each call: makes queueing, timeouts and draining observable."""

    def __init__(self, inner: Runner, delay_s: float) -> None:
        super().__init__(inner.card, source=inner.source, device=inner.device)
        self.backend = inner.backend
        self.inner, self.delay_s = inner, delay_s
        self.gate = threading.Event()  # cleared: calls wait until the test opens it
        self.gate.set()

    @classmethod
    def open(cls, path: Any, *, device: str = "cpu") -> Runner:
        raise NotImplementedError("SlowRunner wraps an opened runner")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(30)
        time.sleep(self.delay_s)
        return self.inner(batch)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def zip_with_declared_size(name: str, data: bytes, method: int, declared: int) -> bytes:
    """A zip whose member's headers claim `declared` bytes while its stream inflates to `data`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr(name, data)
    raw = bytearray(buffer.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist()[0]
    struct.pack_into("<I", raw, info.header_offset + 22, declared)  # local header: uncompressed size
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)  # central directory: uncompressed size
    return bytes(raw)


@dataclass(frozen=True)
class SlowSpec:
    """Picklable opener of a SlowRunner (for the inference process of a multi-worker server)."""

    model: str
    delay_s: float

    def open(self) -> Runner:
        from toolkit.runtime.registry import open_model

        return SlowRunner(open_model(self.model), self.delay_s)
