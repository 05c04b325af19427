"""The one preprocessing function: card -> float32 NCHW batches.

Eval, predict, serve, calibration and verification all call `preprocess`, so an exported model is
never fed differently from the one it was checked against. Decoded images are first brought to
uint8 HxWx3 at the card's input size (`to_uint8`, per image, PIL), then normalised in whole batches
with vectorised numpy (`preprocess`). CIFAR arrays skip the per-image step entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .card import ModelCard
from .errors import InputError

# Largest intermediate image (the whole image resized, before the centre crop): 16 M pixels, 48 MB.
MAX_RESIZE_PIXELS = 16_000_000

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


def _resample(name: str) -> int:
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }[name]


def to_uint8(image: Image.Image, card: ModelCard) -> np.ndarray:
    """Resize the shorter side to `card.resize_size`, centre-crop to the input size: uint8 HxWx3.

    Matches torchvision's `Resize(resize_size)` + `CenterCrop(input)` on PIL images. When the image
    already has the input size, it is used as it is (CIFAR images are not resized).

    The full resize is bounded: past `MAX_RESIZE_PIXELS` (a 1,000,000x1 image would resize to
    256,000,000x256), Pillow resizes only the source region under the crop (`box`) straight to
    the input size, with the same sampling positions and filter support (within one or two grey
    levels: Pillow keeps box coordinates in single precision), so any aspect ratio costs one
    input-sized image.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    height, width = card.height, card.width
    if image.size != (width, height):
        w, h = image.size
        scale = card.resize_size / min(w, h)
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
        left, top = round((new_w - width) / 2.0), round((new_h - height) / 2.0)
        if new_w * new_h > MAX_RESIZE_PIXELS:
            sx, sy = w / new_w, h / new_h  # source pixels per resized pixel, as Pillow computes them
            box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
            cropped = image.resize((width, height), _resample(card.interpolation), box=box)
            return np.asarray(cropped, dtype=np.uint8)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), _resample(card.interpolation))
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.uint8)


def _resize_array(array: np.ndarray, card: ModelCard) -> np.ndarray:
    from PIL import Image

    return np.stack([to_uint8(Image.fromarray(img), card) for img in array])


def preprocess(images: np.ndarray | Sequence[Image.Image], card: ModelCard) -> np.ndarray:
    """uint8 NHWC array (or PIL images) -> normalised float32 NCHW, as `card` prescribes."""
    if not isinstance(images, np.ndarray):
        if len(images) == 0:
            raise InputError("no images to preprocess")
        images = np.stack([to_uint8(img, card) for img in images])
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"expected uint8 images shaped (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise InputError(f"expected uint8 images, got {images.dtype}")
    if images.shape[1:3] != (card.height, card.width):
        images = _resize_array(images, card)
    scale, shift = _affine(card)
    # One fused pass: x * (1 / (255 * std)) - mean / std, written straight into NCHW order.
    out = np.empty((images.shape[0], 3, card.height, card.width), dtype=np.float32)
    np.multiply(images.transpose(0, 3, 1, 2), scale, out=out, casting="unsafe")
    out += shift
    return out


def _affine(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    std = np.asarray(card.std, dtype=np.float32)
    mean = np.asarray(card.mean, dtype=np.float32)
    return (1.0 / (255.0 * std)).reshape(1, 3, 1, 1), (-mean / std).reshape(1, 3, 1, 1)
