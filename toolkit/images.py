"""Decode one image file or byte string into an RGB PIL image, robustly.

Shared by predict, eval on folders and the server, so every entry point accepts the same formats
and refuses the same bad inputs: EXIF orientation applied; palette, grayscale, RGBA, CMYK and
16-bit images converted to 8-bit RGB; the first frame of animations; decompression bombs refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageTooLargeError(InputError):
    """More pixels than Pillow's decompression-bomb limit (the server maps this to 413)."""

    http_status = 413


class UnsupportedImageError(InputError):
    """Not an image, truncated, or a mode we cannot convert (the server maps this to 415/400)."""

    http_status = 415


def decode_image(source: str | Path | bytes, *, draft_size: tuple[int, int] | None = None,
                 name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open, verify and convert to RGB. `draft_size` lets JPEG decode at reduced scale (fast).

    `max_pixels` (a server's limit, stricter than Pillow's bomb guard) is checked from the header,
    before a single pixel is decoded.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise DataError(f"{label}: cannot open: {exc.strerror}") from None
    try:
        with handle, warnings.catch_warnings(), Image.open(handle) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{label}: {width}x{height} = {width * height} pixels is over the "
                                         f"limit of {max_pixels}")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"{label}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnsupportedImageError(f"{label}: cannot decode image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
