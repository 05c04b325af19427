"""The PT2 archive (`.pt2`): which kind it is, and the card and facts it carries, read as the zip it is.

`torch.export.save` and AOTInductor's packager both write a PT2 archive: a zip under one root folder
holding `archive_format` (b"pt2") and either `models/<name>.json` with `data/weights/` (an
ExportedProgram: format "pt2") or `data/aotinductor/<name>/` (compiled kernels: format "aoti"),
plus `extra/<file>` entries for whatever the writer adds (torch/export/pt2_archive/constants.py
names these folders). The toolkit's exporters add the card and the facts there, under TorchScript's
names (`card.json`, `artifact.json`). Both formats share the suffix, so the content tells them apart,
as `sniff.sniff_torch` tells TorchScript from checkpoints. Nothing here imports torch: `toolkit info`
and format detection read these files in milliseconds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

from .artifacts import (
    TORCHSCRIPT_CARD_FILE,
    TORCHSCRIPT_FACTS_FILE,
    ArtifactFacts,
    archive_extra_files,
    card_from_json,
)
from .card import ModelCard
from .errors import DataError, ModelFormatError, first_line
from .paths import require_file

FORMATS = ("pt2", "aoti")  # the artifact formats stored as PT2 archives
CARD_FILE, FACTS_FILE = TORCHSCRIPT_CARD_FILE, TORCHSCRIPT_FACTS_FILE
ARCHIVE_FORMAT = b"pt2"  # the content of <root>/archive_format


def pt2_extra_files(card: ModelCard, facts: ArtifactFacts) -> dict[str, str]:
    """`extra_files` for `torch.export.save` / `package_pt2`."""
    return {CARD_FILE: card.to_json(), FACTS_FILE: facts.to_json()}


def kind_of(archive: zipfile.ZipFile) -> str | None:
    """"aoti" | "pt2" | None (not a PT2 archive, or one holding neither a program nor kernels)."""
    names = archive.namelist()
    if not names:
        return None
    root = names[0].split("/", 1)[0]
    marker = f"{root}/archive_format"
    if marker not in names or archive.read(marker).strip() != ARCHIVE_FORMAT:
        return None
    if any(n.startswith(f"{root}/data/aotinductor/") for n in names):
        return "aoti"
    if any(n.startswith(f"{root}/models/") and n.endswith(".json") for n in names):
        return "pt2"
    return None


def pt2_format(path: str | Path) -> str:
    """The format of a `.pt2` file from its content; anything else is one ModelFormatError."""
    return _read(Path(path), ())[0]


def _read(path: Path, names: Sequence[str]) -> tuple[str, dict[str, bytes]]:
    """(kind, the `extra/` entries named) of a PT2 archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            kind = kind_of(archive)
            extra = archive_extra_files(archive, path, names) if kind else {}
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise ModelFormatError(f"{path}: not a readable .pt2 archive ({first_line(exc)})") from None
    if kind is None:
        raise ModelFormatError(f"{path}: a .pt2 file that is neither a torch.export program nor an "
                               "AOTInductor package")
    return kind, extra


def read_pt2(path: str | Path) -> tuple[ModelCard, ArtifactFacts]:
    """Card and facts of a torch.export program or AOTInductor package; the format comes from the
    content (a file renamed or facts edited by hand do not change what it is)."""
    path = require_file(path, error=ModelFormatError, what=".pt2 archive")
    kind, extra = _read(path, (CARD_FILE, FACTS_FILE))
    if CARD_FILE not in extra or FACTS_FILE not in extra:
        missing = " and ".join(f"extra/{n}" for n in (CARD_FILE, FACTS_FILE) if n not in extra)
        raise ModelFormatError(f"{path} carries no {missing}: a .pt2 written outside the toolkit; export it "
                               f"with toolkit export --format {kind}")
    card = card_from_json(extra[CARD_FILE], path)
    try:
        facts = ArtifactFacts.from_json(extra[FACTS_FILE])
    except (DataError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: its artifact facts are unreadable: {first_line(exc)}") from None
    return card, facts.replace(format=kind)
