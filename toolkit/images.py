"""Decode one image file or byte string into an RGB PIL image, robustly.

Shared by predict, eval on folders and the server, so every entry point accepts the same formats
and refuses the same bad inputs: EXIF orientation applied; palette, grayscale, RGBA, CMYK and
16-bit images converted to 8-bit RGB; the first frame of animations; only the formats the README
lists (others are refused by their magic bytes, before their decoder runs); images over
`MAX_PIXELS` refused from the header, before a pixel is decoded; any decoder failure is an
`UnsupportedImageError`, never a traceback.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .errors import DataError, InputError, ToolkitError
from .paths import require_file

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Pillow format ids of the suffixes above; `Image.open(formats=...)` identifies by magic bytes
# and never hands anything else (DDS, BLP, SPIDER, EPS, ...) to a decoder.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# The default pixel limit for every entry point (predict, folder eval, the server's --max-pixels
# overrides it): 50 M pixels decode to 150 MB of RGB.
MAX_PIXELS = 50_000_000

_pil_ready = threading.Lock()
_PIL_MODULES = re.compile(r"PIL\.")  # the module filter of Pillow's own warnings

class ImageTooLargeError(InputError):
    """More pixels than the limit (the server maps this to 413)."""

    http_status = 413


class UnsupportedImageError(InputError):
    """Not an image, truncated, or a mode we cannot convert (the server maps this to 415/400)."""

    http_status = 415


def _pil() -> None:
    """Our own pixel limit replaces Pillow's bomb warning, so silence it (and Pillow's warnings
    about damaged files, which end as a decoded image or an error anyway).

    Process-wide filters, because `warnings.catch_warnings` is not thread-safe and images decode in
    thread pools; in place before `Image.open`, which is where Pillow warns. Re-applied each call
    (a duplicate filter is replaced, not added) in case something reset the filters.
    """
    from PIL import Image

    ours = [("ignore", None, UserWarning, _PIL_MODULES, 0),
            ("ignore", None, Image.DecompressionBombWarning, None, 0)]
    if warnings.filters[:2] == ours:  # in place already (the usual case): ~8 µs saved per image
        return
    with _pil_ready:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=_PIL_MODULES.pattern)


def decode_image(source: str | Path | bytes, *, draft_size: tuple[int, int] | None = None,
                 name: str | None = None, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open, verify and convert to RGB. `draft_size` lets JPEG decode at reduced scale (fast).

    `max_pixels` (default `MAX_PIXELS`; None keeps only Pillow's own bomb guard) is checked from
    the header, before a single pixel is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    _pil()
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    handle: BinaryIO
    try:
        if isinstance(source, bytes):
            handle = io.BytesIO(source)
        else:
            handle = require_file(source, what="image").open("rb")
    except OSError as exc:
        raise DataError(f"{label}: cannot open: {exc.strerror}") from None
    try:
        with handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{label}: {width}x{height} = {width * height} pixels is over the "
                                         f"limit of {max_pixels}")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.seek(0)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
            return _to_rgb(image)
    except ToolkitError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"{label}: not a recognised image file (supported: "
                                    f"{', '.join(IMAGE_FORMATS)})") from None
    except MemoryError:
        raise ImageTooLargeError(f"{label}: image too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes meet C decoders: any failure is "unreadable"
        raise UnsupportedImageError(f"{label}: cannot decode image ({_reason(exc)})") from None


def _reason(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _to_rgb(image: Image.Image) -> Image.Image:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
