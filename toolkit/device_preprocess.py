"""`preprocess()` on the model's device: uint8 NHWC in, normalised NCHW out, in the model's dtype.

Uploading uint8 instead of float32 moves 4x fewer bytes to the GPU; the arithmetic is the same
float32 multiply-then-add with the same constants as toolkit/preprocess.py (one source of truth,
tested equal on device="cpu"), and only then cast to fp16/bf16. Imports torch: only the torch
runners use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .card import ModelCard
from .errors import InputError
from .names import RUN_PRECISIONS
from .preprocess import _affine  # the constants preprocess() itself uses

DTYPES = RUN_PRECISIONS  # the compute precisions a device batch can be normalised into


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class DeviceNormalizer:
    """uint8 (N, H, W, 3) tensor on `device` -> (N, 3, H, W) in `dtype`, equal to preprocess()."""

    def __init__(self, card: ModelCard, device: Any = "cpu", precision: str = "fp32",
                 channels_last: bool = False) -> None:
        import torch

        scale, shift = _affine(card)
        self.card = card
        self.scale = torch.from_numpy(scale).to(device)
        self.shift = torch.from_numpy(shift).to(device)
        self.dtype = torch_dtype(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Any) -> Any:
        import torch

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"expected uint8 images shaped (N, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        # NHWC memory seen as NCHW is channels-last already; mul then add in float32, as numpy does
        x = images.permute(0, 3, 1, 2).float()
        x = torch.mul(x, self.scale).add_(self.shift)
        return x.to(dtype=self.dtype, memory_format=self.memory_format)


class PinnedUploader:
    """Host uint8 batches -> `device` through one reusable page-locked buffer (asynchronous copy).

    On the CPU it only wraps the array. The buffer grows to the largest batch seen; an event keeps
    the next batch from overwriting it before the previous copy has left.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self._buffer: Any = None
        self._copied: Any = None

    def __call__(self, images: np.ndarray) -> Any:
        import torch

        host = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type != "cuda":
            return host
        if self._buffer is None or self._buffer.numel() < host.numel():
            self._buffer = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
        if self._copied is not None:
            self._copied.synchronize()
        staged = self._buffer[:host.numel()].view(host.shape)
        staged.copy_(host)
        on_device = staged.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device
