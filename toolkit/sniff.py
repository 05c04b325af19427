"""What kind of file a path is, from its first bytes: below the runtime, beside the byte-level readers.

Format detection (`runtime.registry.detect_format`) and the checkpoint loader (`toolkit.checkpoint`)
both ask; neither needs torch, so nothing here imports it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

SAFETENSORS_HEADER_LIMIT = 100 * 1024**2  # a larger declared header is not a safetensors file


def sniff_torch(path: Path) -> str | None:
    """"torchscript" | "checkpoint" | None from the first bytes (and a zip's member names).

    torch.save writes a zip holding `<archive>/data.pkl` (TorchScript adds `code/` and
    `constants.pkl`), or, in the legacy format, a pickle (protocol 2+: b"\\x80\\x02"...);
    safetensors starts with an 8-byte little-endian header length and a JSON object.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "checkpoint" if any(n.endswith("data.pkl") for n in names) else None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "checkpoint"
    if is_safetensors_head(head):
        return "checkpoint"
    return None


def is_safetensors_head(head: bytes) -> bool:
    """safetensors files open with an 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and \
        0 < int.from_bytes(head[:8], "little") < SAFETENSORS_HEADER_LIMIT
