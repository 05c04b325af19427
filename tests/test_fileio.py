"""toolkit.fileio: atomic files and folders, recovery after kill -9, stale staging, full disks, sizes."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from toolkit import fileio
from toolkit.errors import ExportError, NoSpaceError


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (hidden ones too): file bytes, or None for a folder."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def fail_while_writing(context: Any, exc: BaseException) -> None:
    """Enter an atomic_path/atomic_directory, write into what it yields, then fail with `exc`."""
    with context as staged:
        (staged / "config.pbtxt" if staged.is_dir() else staged).write_text("partial")
        raise exc


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_model(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text)
    (folder / "1").mkdir()
    (folder / "1" / "model.onnx").write_text(text * 3)
    return folder


# --- files --------------------------------------------------------------------------------------

def test_atomic_path_replaces_file_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    with fileio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".onnx" and tmp.name.startswith(".out.onnx.tmp-")
        tmp.write_bytes(b"new")
    with pytest.raises(RuntimeError, match="writer failed"):
        fail_while_writing(fileio.atomic_path(target), RuntimeError("writer failed"))
    assert target.read_bytes() == b"new"
    target.write_bytes(b"old")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert target.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_path_never_replaces_a_folder(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="is a directory"), fileio.atomic_path(folder):
        pytest.fail("atomic_path must refuse before handing out a temporary path")
    assert (folder / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EDQUOT, "Disk quota exceeded"),
                                 RuntimeError("writer: [Errno 28] No space left on device")])
def test_full_disk_is_one_line_and_nothing_partial(tmp_path, exc):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(NoSpaceError) as caught:
        fail_while_writing(fileio.atomic_path(target), exc)
    assert str(caught.value) == f"no space left on {tmp_path}"
    assert snapshot(tmp_path) == {"report.json": b"old"}


def test_vague_writer_error_on_a_full_disk_is_no_space(tmp_path, monkeypatch):
    """torch.jit.save says only "file write failed"; a nearly full filesystem explains it."""
    monkeypatch.setattr(fileio, "_nearly_full", lambda folder: True)
    vague = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(NoSpaceError):
        fail_while_writing(fileio.atomic_path(tmp_path / "m.ts"), vague)
    assert not any(tmp_path.iterdir())


def test_os_error_mapping(tmp_path):
    assert isinstance(fileio.os_error(OSError(errno.ENOSPC, "x"), tmp_path), NoSpaceError)
    other = fileio.os_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert type(other) is ExportError and str(other) == f"cannot write to {tmp_path}: Permission denied"


# --- folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_swaps_and_rolls_back(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    repo = tmp_path / "repo"
    make_model(repo / "digits", "old")
    (repo / "other").mkdir()
    (repo / "other" / "f").write_text("other")
    with pytest.raises(ValueError, match="failed mid-write"):
        fail_while_writing(fileio.atomic_directory(repo / "digits"), ValueError("failed mid-write"))
    assert snapshot(repo) == {"digits": None, "digits/1": None, "digits/1/model.onnx": b"oldoldold",
                              "digits/config.pbtxt": b"old", "other": None, "other/f": b"other"}
    with fileio.atomic_directory(repo / "digits") as stage:
        (stage / "config.pbtxt").write_text("new")
    assert snapshot(repo) == {"digits": None, "digits/config.pbtxt": b"new", "other": None,
                              "other/f": b"other"}
    assert (repo / "digits").stat().st_mode & 0o777 == 0o755 & ~_umask()


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "digits").write_text("a file")
    with pytest.raises(ExportError, match="not a directory"), fileio.atomic_directory(tmp_path / "digits"):
        pytest.fail("atomic_directory must refuse before staging anything")
    assert snapshot(tmp_path) == {"digits": b"a file"}


def test_atomic_directory_full_disk(tmp_path):
    make_model(tmp_path / "digits", "old")
    before = snapshot(tmp_path)
    with pytest.raises(NoSpaceError, match=f"^no space left on {re.escape(str(tmp_path))}$"):
        fail_while_writing(fileio.atomic_directory(tmp_path / "digits"), OSError(errno.ENOSPC, "No space"))
    assert snapshot(tmp_path) == before


KILLER = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    from toolkit import fileio

    destination, crash_at, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    steps = 0

    def step():
        global steps
        steps += 1
        if steps == crash_at:
            os._exit(137)  # as kill -9: no cleanup, no finally

    def hooked(real):
        def call(*args, **kwargs):
            step()
            return real(*args, **kwargs)
        return call

    real_exchange = fileio._exchange
    fileio._exchange = hooked(real_exchange) if exchange else (lambda a, b: False)
    os.rename = hooked(os.rename)
    shutil.rmtree = hooked(shutil.rmtree)
    with fileio.atomic_directory(destination) as stage:
        (stage / "config.pbtxt").write_text("new")
        step()
""")


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_kill_at_each_step_of_the_swap_is_recoverable(tmp_path, exchange):
    """kill -9 at every step: the next run finds the old model or the new one, never none or a mix."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    crash_points = 0
    for crash_at in range(1, 10):
        repo = tmp_path / f"repo{crash_at}"
        make_model(repo / "digits", "old")
        (repo / ".gitignore").write_text("*.tmp\n")
        command = [sys.executable, str(script), str(repo / "digits"), str(crash_at), str(int(exchange))]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if run.returncode == 0:  # ran to the end: fewer steps than crash_at
            assert (repo / "digits" / "config.pbtxt").read_text() == "new"
            break
        assert run.returncode == 137, run.stderr
        crash_points += 1
        # what a reader (Triton, the next export) sees after recovery: one whole version
        fileio.recover(repo / "digits")
        content = snapshot(repo / "digits")
        old = {"1": None, "1/model.onnx": b"oldoldold", "config.pbtxt": b"old"}
        assert content in ({"config.pbtxt": b"new"}, old), (crash_at, content)
        # the next export to the same place succeeds and leaves no leftovers
        with fileio.atomic_directory(repo / "digits") as stage:
            (stage / "config.pbtxt").write_text("next")
        assert sorted(p.name for p in repo.iterdir()) == [".gitignore", "digits"], crash_at
        assert (repo / ".gitignore").read_text() == "*.tmp\n"
    assert crash_points >= (3 if exchange else 4)  # the write, the swap step(s) and the clean-up were all hit


def test_recover_restores_a_model_left_between_the_two_renames(tmp_path):
    """The state a kill between `rename(model, backup)` and `rename(new, model)` leaves behind."""
    repo = tmp_path / "repo"
    make_model(repo / f".digits.old-{dead_pid()}-0a1b", "old")
    (repo / f".digits.staging-{dead_pid()}-2c3d").mkdir()
    with fileio.atomic_directory(repo / "fresh") as stage:  # another model: digits is not its business
        (stage / "config.pbtxt").write_text("fresh")
    assert not (repo / "digits").exists()
    assert fileio.recover(repo / "digits") == repo / "digits"
    assert (repo / "digits" / "config.pbtxt").read_text() == "old"
    with fileio.atomic_directory(repo / "digits") as stage:
        (stage / "config.pbtxt").write_text("new")
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "fresh"]


def test_live_backup_is_not_restored_or_removed(tmp_path):
    """A backup whose process still runs is mid-swap: leave it to that process."""
    live = make_model(tmp_path / f".digits.old-{os.getpid()}-0a1b", "old")
    assert fileio.recover(tmp_path / "digits") is None
    assert live.is_dir() and not (tmp_path / "digits").exists()


# --- stale staging ------------------------------------------------------------------------------

def test_clean_stale_removes_only_dead_entries_of_its_own_kind(tmp_path):
    target = tmp_path / "model.onnx"
    dead = tmp_path / f".model.onnx.export-{dead_pid()}-0a1b2c3d"
    live = tmp_path / f".model.onnx.export-{os.getppid()}-0a1b2c3d"  # the test runner's parent: alive
    old_style = tmp_path / ".model.onnx.export-k3j_9x2a"  # tempfile.mkdtemp's names, before pids
    recent_old_style = tmp_path / ".model.onnx.export-zz9_8y7w"
    other_kind = tmp_path / f".model.onnx.tmp-{dead_pid()}-0a1b2c3d.onnx"
    other_target = tmp_path / f".other.onnx.export-{dead_pid()}-0a1b2c3d"
    users = [tmp_path / "model.onnx.export-notes.txt", tmp_path / ".model.onnx.exported"]
    for folder in (dead, live, old_style, recent_old_style, other_target):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    for path in (other_kind, *users):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * fileio.STALE_SECONDS
    os.utime(old_style, (hours_ago, hours_ago))
    removed = fileio.clean_stale(target, "export")
    assert sorted(removed) == sorted([dead, old_style])
    assert all(p.exists() for p in (live, recent_old_style, other_kind, other_target, *users))
    assert not dead.exists() and not old_style.exists()


def test_staging_dir_names_its_process(tmp_path):
    stage = fileio.staging_dir(tmp_path / "model.onnx", "export")
    assert stage.name.startswith(f".model.onnx.export-{os.getpid()}-") and stage.is_dir()
    assert fileio.clean_stale(tmp_path / "model.onnx", "export") == []  # we are alive


# --- sizes --------------------------------------------------------------------------------------

def test_artifact_size_counts_companions_and_folders(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"e" * 100)
    (tmp_path / "m.engine.card.json").write_bytes(b"c" * 10)
    (tmp_path / "m.engine.facts.json").write_bytes(b"f" * 7)
    (tmp_path / "m.engine.failed-verify").mkdir()  # not a companion
    (tmp_path / "m.engine.bak").write_bytes(b"b" * 1000)  # nor is this
    assert fileio.artifact_size(engine) == 117
    onnx = tmp_path / "big.onnx"
    onnx.write_bytes(b"o" * 5)
    (tmp_path / "big.onnx.data").write_bytes(b"d" * 50)
    assert fileio.artifact_size(onnx) == 55
    repo = make_model(tmp_path / "repo" / "digits", "abc")
    (repo / "link").symlink_to(tmp_path / "m.engine.bak")  # symlinks are not followed
    assert fileio.artifact_size(repo) == 3 + 9 + len(os.readlink(repo / "link"))


# --- publishing an export's staged files ------------------------------------------------------------

def staged(tmp_path: Path, names: dict[str, str]) -> Path:
    folder = fileio.staging_dir(tmp_path / "m.onnx", "export")
    for name, text in names.items():
        (folder / name).write_text(text)
    return folder


def test_publish_staged_moves_companions_then_the_artifact_or_puts_them_aside(tmp_path, monkeypatch):
    source = tmp_path / "m.pt"
    source.write_text("weights")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_text("old")
    artifact = out / "m.onnx"
    renames: list[str] = []
    real = os.replace

    def record(a, b):
        renames.append(Path(b).name)
        real(a, b)

    files = {"m.onnx": "new", "m.onnx.data": "weights"}
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", record)
        assert fileio.publish_staged(staged(tmp_path, files), artifact, source, passed=True,
                                     aside_tag="failed-verify") == artifact
    assert renames == ["m.onnx.data", "m.onnx"] and artifact.read_text() == "new"
    one = fileio.publish_staged(staged(tmp_path, {"m.onnx": "bad"}), artifact, source, passed=False,
                                aside_tag="failed-verify")
    assert one == out / "m.failed-verify.onnx" and artifact.read_text() == "new"
    several = fileio.publish_staged(staged(tmp_path, {"m.onnx": "bad", "m.onnx.data": "bad"}), artifact,
                                    source, passed=False, aside_tag="failed-verify")
    assert several == out / "m.onnx.failed-verify" / "m.onnx" and several.read_text() == "bad"


def test_publishing_never_replaces_the_input_or_a_folder(tmp_path):
    from toolkit.errors import UsageError

    source = tmp_path / "m.onnx"
    source.write_text("the checkpoint")
    with pytest.raises(UsageError, match="is the input checkpoint"):
        fileio.publish_staged(staged(tmp_path, {"m.onnx": "new"}), source, source, passed=True,
                              aside_tag="failed-verify")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        fileio.publish_staged(staged(tmp_path, {"folder.onnx": "new"}), tmp_path / "folder.onnx",
                              tmp_path / "elsewhere.pt", passed=True, aside_tag="failed-verify")
    assert source.read_text() == "the checkpoint" and (tmp_path / "folder.onnx").is_dir()

