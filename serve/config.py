"""Server settings: one frozen dataclass filled by `toolkit serve` flags (and by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching knobs. Defaults are the CLI defaults. `name`/`version` name a single model
    handed over as a Runner or opener (serve.repository.as_source); batching knobs are the defaults of
    every model whose own config (config.pbtxt) is silent."""

    name: str = "model"
    version: str = "1"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # the v2 gRPC endpoint (serve.grpc); 0: none (`toolkit serve` defaults to 8001)
    max_batch_size: int = 32
    max_delay_ms: float = 0.0  # 0: a batch is whatever queued while the runner was busy
    max_queue: int = 256  # requests waiting for the runner; beyond -> 503 + Retry-After
    timeout_s: float = 30.0  # a request waiting (queue + run) longer -> 504
    max_body_mb: float = 16.0
    max_pixels: int = 50_000_000  # per image, checked from the header before decoding
    max_images: int = 256  # per /predict request
    max_zip_ratio: int = 8  # /evaluate zips: bytes inflated <= this x the body limit (each member <= 1x)
    max_header_kb: int = 64  # request line + headers; larger -> 431
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this -> else 408
    body_timeout_s: float = 30.0  # the whole body must arrive within this -> else 408
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; beyond -> 503 and closed at once
    api_key: str | None = None
    decode_workers: int = 2  # threads per process that decode and preprocess images (--decode-threads)
    workers: int = 1  # front-end processes (--workers); > 1: serve.workers, one inference process
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    warmup: bool = True
    reject_nonfinite: bool = False  # 400 for NaN/Inf inputs (Triton accepts them: the model's business)
    model_control: str = "none"  # Triton's --model-control-mode: none | explicit (load/unload on request)
    load_models: tuple[str, ...] = ()  # explicit mode: the models loaded at start (`*`: all)
    reserved_ports: bool = False  # the parent holds the ports (serve.ports): join them with SO_REUSEPORT

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_zip_bytes(self) -> int:
        return self.max_zip_ratio * self.max_body_bytes


def wire_name(model: str, name: str | None = None) -> str:
    """The model's name in URLs and v2 metadata: `name`, else the file's stem (a URL's last part)."""
    if name:
        return name
    return model.rstrip("/").rsplit("/", 1)[-1] if model.startswith("http") else Path(model).stem
