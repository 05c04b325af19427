"""Server settings: one frozen dataclass filled by `toolkit serve` flags (and by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching knobs. Defaults are the CLI defaults."""

    name: str = "model"
    version: str = "1"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_delay_ms: float = 0.0  # 0: a batch is whatever queued while the runner was busy
    max_queue: int = 256  # requests waiting for the runner; beyond -> 503 + Retry-After
    timeout_s: float = 30.0  # a request waiting (queue + run) longer -> 504
    max_body_mb: float = 16.0
    max_pixels: int = 50_000_000  # per image, checked from the header before decoding
    max_images: int = 256  # per /predict request
    api_key: str | None = None
    decode_workers: int = 2
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    warmup: bool = True

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
