"""JPEGs decoded on the GPU (nvjpeg through torchvision, batched) and resized there; others on the CPU.

`tensor_uint8_batches` yields uint8 (N, H, W, 3) tensors on `device`, in input order, at the card's
input size with the card's geometry (toolkit/preprocess.py `to_uint8`: shorter side to
`resize_size`, centre crop) and interpolation (antialiased, as Pillow's). Files are read, and their
headers checked, on the decode pool's threads; a JPEG the GPU path cannot take (CMYK, progressive
that nvjpeg refuses, over the resize bound, a lanczos card) and every other format go through the
CPU path, which also gives a bad file its own error. On device="cpu" the same code runs with
torchvision's CPU decoder, which is how it is tested without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .card import ModelCard
from .decode_pool import DecodePool, load_uint8
from .images import MAX_PIXELS
from .preprocess import MAX_RESIZE_PIXELS

JPEG_MAGIC = b"\xff\xd8\xff"
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # lanczos: PIL only
MAX_FILE_BYTES = 256 * 1024**2


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def resized_geometry(width: int, height: int, card: ModelCard) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the resize and crop `to_uint8` applies, computed the same way."""
    scale = card.resize_size / min(width, height)
    new_w, new_h = max(card.width, round(width * scale)), max(card.height, round(height * scale))
    return new_w, new_h, round((new_w - card.width) / 2.0), round((new_h - card.height) / 2.0)


def gpu_eligible(data: bytes, card: ModelCard) -> bool:
    """A JPEG in RGB or grayscale (nvjpeg's), within the pixel limits, for a card a tensor resize matches."""
    if not is_jpeg(data) or card.interpolation not in TENSOR_INTERPOLATIONS:
        return False
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:  # header only
            width, height = image.size
            mode = image.mode
    except Exception:  # noqa: BLE001 - the CPU path gives the file its proper error
        return False
    if mode not in ("RGB", "L") or width * height > MAX_PIXELS:
        return False
    new_w, new_h, _, _ = resized_geometry(width, height, card)
    return new_w * new_h <= MAX_RESIZE_PIXELS


def resize_crop_tensor(image: Any, card: ModelCard) -> Any:
    """uint8 (3, H, W) tensor -> uint8 (H', W', 3) at the card's input size, as `to_uint8` does on PIL."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = int(image.shape[-2]), int(image.shape[-1])
    if (width, height) != (card.width, card.height):
        new_w, new_h, left, top = resized_geometry(width, height, card)
        if (new_w, new_h) != (width, height):
            # Pillow's NEAREST samples pixel centres: torchvision's "nearest-exact", not its "nearest"
            nearest = card.interpolation == "nearest"
            mode = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode(card.interpolation)
            image = F.resize(image, [new_h, new_w], interpolation=mode, antialias=not nearest)
        image = image[:, top:top + card.height, left:left + card.width]
    return image.permute(1, 2, 0)


def _read(path: Path, card: ModelCard) -> tuple[bytes | None, bool]:
    """(bytes, GPU-eligible) read on a pool thread; (None, False) sends the file to the CPU path."""
    from .paths import read_bytes_bounded

    try:
        data = read_bytes_bounded(path, MAX_FILE_BYTES, what="image")
    except Exception:  # noqa: BLE001 - the CPU path names what is wrong with it
        return None, False
    return data, gpu_eligible(data, card)


def decode_jpegs(blobs: Sequence[bytes], device: str) -> list[Any]:
    """uint8 (3, H, W) tensors on `device`, one batched nvjpeg call; a batch failure retries one by one
    and marks the files that fail with None (they go to the CPU path)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device,
                                apply_exif_orientation=True))
    except RuntimeError:
        out: list[Any] = []
        for tensor in tensors:
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device,
                                       apply_exif_orientation=True))
            except RuntimeError:
                out.append(None)
        return out


def tensor_uint8_batches(paths: Sequence[Path], card: ModelCard, batch_size: int, device: str = "cuda",
                         workers: int | None = None) -> Iterator[Any]:
    """uint8 (N, H, W, 3) tensors on `device`, in order: JPEGs decoded there, the rest on the CPU pool."""
    import torch

    load = functools.partial(load_uint8, card=card)
    read = functools.partial(_read, card=card)
    with DecodePool(workers) as pool:
        reads = pool.map(read, paths, window=2 * batch_size + 4 * pool.workers)
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            blobs = [next(reads) for _ in chunk]
            out = torch.empty((len(chunk), card.height, card.width, 3), dtype=torch.uint8, device=device)
            on_gpu = [i for i, (_, ok) in enumerate(blobs) if ok]
            decoded = decode_jpegs([blobs[i][0] for i in on_gpu], device) if on_gpu else []  # type: ignore[misc]
            cpu = sorted(set(range(len(chunk))) - set(on_gpu))
            for i, image in zip(on_gpu, decoded):
                if image is None:
                    cpu.append(i)
                else:
                    out[i] = resize_crop_tensor(image, card)
            cpu.sort()
            for i, array in zip(cpu, pool.map(load, [chunk[i] for i in cpu])):
                out[i] = torch.tensor(array, device=device)
            yield out


def decode_agreement(runner: Any, dataset: Any, *, batch_size: int = 256, limit: int = 512,
                     workers: int | None = None) -> dict[str, Any]:
    """`runner`'s logits on the first `limit` files decoded on its device vs on the CPU (Pillow), as
    `metrics.logits_agreement` reports them (top-1 agreement, max/mean |diff|).

    JPEG decoders differ slightly (IDCT, chroma upsampling), so logits differ a little; the issue's
    bar is 99.5% top-1 agreement. Both go through `run_uint8`, so only the decode path differs.
    """
    from .metrics import logits_agreement

    paths = list(dataset.paths[:limit])
    if not paths:
        return logits_agreement(np.zeros((0, 1)), np.zeros((0, 1)))
    on_device = [runner.run_uint8(b) for b in tensor_uint8_batches(paths, runner.card, batch_size,
                                                                   device=runner.device, workers=workers)]
    with DecodePool(workers) as pool:
        load = functools.partial(load_uint8, card=runner.card)
        on_cpu = [runner.run_uint8(b) for b in pool.batches(load, paths, batch_size)]
    return logits_agreement(np.concatenate(on_cpu), np.concatenate(on_device))
