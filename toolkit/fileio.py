"""Publishing files and folders: an interrupted or failed write never leaves a half-written artifact.

Every output of the toolkit goes through here:

- `atomic_path(dest)` / `atomic_write_bytes` / `atomic_write_text`: a file written beside `dest` and
  renamed over it (one `rename`, so readers see the old file or the new one);
- `atomic_directory(dest)`: a folder built beside `dest` and swapped in. On Linux the swap is one
  `renameat2(RENAME_EXCHANGE)`; where the filesystem cannot exchange, it is two renames through a
  backup named `.<name>.old-<pid>-*`, and a process killed between them is repaired by the next
  `atomic_directory`/`recover` on the same destination (the backup goes back into place);
- `staging_dir(dest, kind)` / `clean_stale(dest, kind)`: private working folders named
  `.<name>.<kind>-<pid>-<random>`, so the next run can tell a dead process's leftovers (removed) from
  a live concurrent one's (kept);
- `publish_staged` / `publish_model_folder`: an export's staged files moved into place (companions
  first, the artifact last; a model folder by `swap_in`), or aside when it failed its check;
- `artifact_size(path)`: the bytes an artifact occupies, companions included;
- `os_error(exc, path)`: a failed write as one line; a full disk is `NoSpaceError`
  ("no space left on <path>").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError, NoSpaceError, ToolkitError, UsageError

# Files that travel with an artifact under `<name><suffix>`: ONNX external data, the card sidecar
# (toolkit/card.py CARD_SUFFIX), the artifact-facts sidecar. `artifact_size` counts them.
COMPANION_SUFFIXES: tuple[str, ...] = (".data", ".card.json", ".facts.json")
# A leftover without a process id in its name (written by an older version) is stale after this long.
STALE_SECONDS = 3600.0
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_RENAME_EXCHANGE = 2


# --- errors -------------------------------------------------------------------------------------

def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota. Writers such as torch.jit.save and
    protobuf wrap the OSError in their own exception types, so the chain and message are read too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _nearly_full(folder: Path) -> bool:
    """Less than 64 KiB free where a writer failed: its vague error ("file write failed") was the disk."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 1024


def os_error(exc: BaseException, path: str | Path) -> ToolkitError:
    """The one-line error for a failed write at `path`: NoSpaceError for a full disk, else ExportError."""
    if is_no_space(exc):
        return NoSpaceError(f"no space left on {path}")
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0:1] or [type(exc).__name__]
    return ExportError(f"cannot write to {path}: {reason if isinstance(reason, str) else reason[0]}")


def _map_write_failure(exc: BaseException, path: Path) -> BaseException | None:
    """The error to raise instead of `exc` after a write at `path` failed, or None to re-raise it."""
    if isinstance(exc, ToolkitError) or not isinstance(exc, Exception):
        return None
    if is_no_space(exc) or (not isinstance(exc, OSError) and _nearly_full(path.parent)):
        return NoSpaceError(f"no space left on {path.parent}")
    if isinstance(exc, OSError):
        return os_error(exc, path.parent)
    return None


# --- files --------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(destination: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it into place on success.

    The temporary file keeps the destination's suffix so writers that infer the format from it
    (onnx, torch.jit.save) behave. On any exception the temporary is removed and the destination
    is untouched; a full disk becomes NoSpaceError. A destination that is a directory is refused:
    replacing a folder with a file would delete what is in it.
    """
    destination = Path(destination)
    folder = destination.parent
    if destination.is_dir() and not destination.is_symlink():
        raise ExportError(f"{destination} is a directory; refusing to replace it with a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(destination, "tmp")
        ending = suffix or "".join(destination.suffixes[-1:]) or ".tmp"
        tmp = folder / f".{destination.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ending}"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as exc:
        raise os_error(exc, folder) from None
    try:
        yield tmp
        os.replace(tmp, destination)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        mapped = _map_write_failure(exc, destination)
        if mapped is not None:
            raise mapped from None
        raise


def atomic_write_bytes(destination: str | Path, data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


def atomic_write_text(destination: str | Path, text: str) -> Path:
    return atomic_write_bytes(destination, text.encode("utf-8"))


# --- staging folders and their leftovers --------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner_dead(entry: Path, pattern: re.Pattern[str]) -> bool:
    match = pattern.match(entry.name)
    if match is None:
        return False
    pid = match.group("pid")
    if pid is not None:
        return not _pid_alive(int(pid))
    try:  # no pid in the name: judge by age
        return time.time() - entry.lstat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def _leftovers(destination: Path, kind: str) -> re.Pattern[str]:
    """`.<name>.<kind>-<pid>-<random>` (and the older `.<name>.<kind>-<random>` without a pid)."""
    name, kind = re.escape(destination.name), re.escape(kind)
    return re.compile(rf"^\.{name}\.{kind}-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale(destination: str | Path, kind: str) -> list[Path]:
    """Remove `.<name>.<kind>-*` entries beside `destination` whose process is gone; return them.

    Only this destination's entries of this kind are touched, and never one whose process still
    runs (a concurrent export to the same place keeps its staging).
    """
    destination = Path(destination)
    pattern = _leftovers(destination, kind)
    removed: list[Path] = []
    try:
        entries = list(destination.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if _owner_dead(entry, pattern):
            _remove(entry)
            removed.append(entry)
    return removed


def staging_dir(destination: str | Path, kind: str = "staging") -> Path:
    """A new private folder `.<name>.<kind>-<pid>-<random>` beside `destination` (same filesystem,
    so its contents can be renamed into place). Stale ones of this kind are removed first."""
    destination = Path(destination)
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(destination, kind)
        path = folder / f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o755)
    except OSError as exc:
        raise os_error(exc, folder) from None
    return path


# --- folders ------------------------------------------------------------------------------------

def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def recover(destination: str | Path) -> Path | None:
    """Repair what a process killed mid-swap left: if `destination` is missing and a dead process's
    backup of it exists, put the backup back (returned); other dead backups are removed."""
    destination = Path(destination)
    pattern = _leftovers(destination, "old")
    try:
        backups = [e for e in destination.parent.iterdir() if _owner_dead(e, pattern)]
    except OSError:
        return None
    restored = None
    if backups and not os.path.lexists(destination):
        newest = max(backups, key=lambda e: e.lstat().st_mtime)
        os.rename(newest, destination)
        backups.remove(newest)
        restored = destination
    for backup in backups:
        _remove(backup)
    return restored


def swap_in(source: Path, destination: Path, *, use_exchange: bool = True) -> None:
    """Put folder `source` at `destination`, replacing what is there; the old content is deleted
    only once the new one is in place. A kill at any point leaves `destination` whole, or (two-rename
    fallback only) a backup that `recover` puts back."""
    if not os.path.lexists(destination):
        os.rename(source, destination)
        return
    if use_exchange and _exchange(source, destination):
        _remove(source)  # now the old content; if we die first, clean_stale removes it (our pid)
        return
    backup = destination.with_name(f".{destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(destination, backup)
    try:
        os.rename(source, destination)
    except BaseException:
        os.rename(backup, destination)
        raise
    _remove(backup)


@contextlib.contextmanager
def atomic_directory(destination: str | Path, *, kind: str = "staging") -> Iterator[Path]:
    """Yield an empty folder beside `destination`; on success swap it in (with rollback), on any
    exception remove it and leave `destination` as it was. A full disk becomes NoSpaceError.

    Before staging, a previous run's interrupted swap is repaired (`recover`) and stale staging
    folders of this kind are removed. `destination` may not be a file.
    """
    destination = Path(destination)
    if os.path.lexists(destination) and not destination.is_dir():
        raise ExportError(f"{destination} exists and is not a directory; refusing to replace it")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        recover(destination)
    except OSError as exc:
        raise os_error(exc, destination.parent) from None
    staging = staging_dir(destination, kind)
    try:
        yield staging
        swap_in(staging, destination)
    except BaseException as exc:
        _remove(staging)
        mapped = _map_write_failure(exc, destination)
        if mapped is not None:
            raise mapped from None
        raise


# --- publishing what an export staged ------------------------------------------------------------

def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same inode: a hard link counts); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(target: Path, source: Path) -> None:
    """Publishing to `target` must not replace or delete `source` (itself, or a folder holding it)."""
    if same_file(target, source):
        raise UsageError(f"the output {target} is the input checkpoint; choose another -o")
    if target.is_dir() and not target.is_symlink():
        try:
            source.resolve().relative_to(target.resolve())
        except ValueError:
            return
        raise UsageError(f"the output {target} holds the input checkpoint {source}; choose another -o")


def aside_path(output: Path, tag: str) -> Path:
    """model.int8.onnx -> model.int8.<tag>.onnx; model_repo -> model_repo.<tag>."""
    if output.suffix and not output.is_dir():
        return output.with_name(f"{output.stem}.{tag}{output.suffix}")
    return output.with_name(f"{output.name}.{tag}")


def _publish_entry(entry: Path, target: Path) -> None:
    """One staged file by rename, one staged folder by `swap_in`; a file never replaces a folder or back."""
    if entry.is_dir() and not entry.is_symlink():
        if target.exists() and not target.is_dir():
            raise ExportError(f"{target} is a file; refusing to replace it with a folder")
        swap_in(entry, target)
    else:
        if target.is_dir() and not target.is_symlink():
            raise ExportError(f"{target} is a folder; refusing to replace it with a file")
        os.replace(entry, target)


def publish_staged(staging: Path, artifact: Path, source: Path, *, passed: bool, aside_tag: str) -> Path:
    """Move what a writer staged into `artifact`'s folder (companions first, the artifact last), so a
    reader never finds the artifact without its companions; or, when it failed its check, aside under
    `aside_tag` (one file: `aside_path`; several that name each other: together in one folder).
    Returns where the artifact is now. Nothing replaces or deletes `source`."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == artifact.name)
    for entry in entries:
        check_not_input(artifact.parent / entry.name, source)
    if passed:
        for entry in entries:
            _publish_entry(entry, artifact.parent / entry.name)
        return artifact
    if len(entries) == 1 and entries[0].name == artifact.name:
        aside = aside_path(artifact, aside_tag)
        check_not_input(aside, source)
        _publish_entry(entries[0], aside)
        return aside
    aside = artifact.with_name(f"{artifact.name}.{aside_tag}")
    check_not_input(aside, source)
    if os.path.lexists(aside):
        _remove(aside)
    os.replace(staging, aside)
    return aside / artifact.name


def publish_model_folder(staging: Path, artifact: Path, repository: Path, source: Path, *, passed: bool,
                         aside_tag: str) -> Path:
    """A staged model folder goes into `repository` by one exchange (`swap_in`); a failed one into the
    sibling repository `<repository>.<aside_tag>/`, so the served repository never holds it."""
    check_not_input(artifact, source)
    built = staging / artifact.name
    if passed:
        _publish_entry(built, artifact)
        return artifact
    aside_repository = repository.with_name(f"{repository.resolve().name}.{aside_tag}")
    aside = aside_repository / artifact.name
    check_not_input(aside, source)
    aside_repository.mkdir(exist_ok=True)
    _publish_entry(built, aside)
    return aside


# --- sizes --------------------------------------------------------------------------------------

def companions(path: str | Path) -> list[Path]:
    """The existing files that travel with artifact `path` (`<name>.data`, `<name>.card.json`, ...)."""
    path = Path(path)
    return [c for c in (path.with_name(path.name + s) for s in COMPANION_SUFFIXES) if c.is_file()]


def artifact_size(path: str | Path) -> int:
    """Bytes of an artifact: a folder's files (symlinks not followed), or a file plus its companions."""
    path = Path(path)
    if path.is_dir():
        total = 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total
    return path.stat().st_size + sum(c.stat().st_size for c in companions(path))
