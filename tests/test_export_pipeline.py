"""export.pipeline: the format registry, typed options, and what an export may do to the files around it
(issue 9, "Data loss"): folders are never replaced, the input is never overwritten, a Triton repository
keeps everything but the model's folder, killed exports are cleaned up, and a full disk is one line."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
from typer.testing import CliRunner

from export import pipeline
from export.pipeline import FormatSpec, TensorRTOptions, format_spec, run_export
from toolkit import names
from toolkit.errors import ExportError, NoSpaceError, UsageError

runner = CliRunner()


def invoke(*args: object):
    from toolkit.cli import app

    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path, skip: str | None = None) -> dict[str, bytes | None]:
    """Every entry under `folder`, hidden ones too (file bytes, None for folders), but `skip/`."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if skip is not None and relative.parts[0] == skip:
            continue
        if path.is_symlink():
            entries[str(relative)] = b"-> " + os.fsencode(os.readlink(path))
        else:
            entries[str(relative)] = None if path.is_dir() else path.read_bytes()
    return entries


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def ckpt(tmp_path, sample_model):
    """A private copy of the sample checkpoint (and its card) in its own folder."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for source in (sample_model, sample_model.with_name(sample_model.name + ".card.json")):
        shutil.copy(source, folder / source.name)
    return folder / sample_model.name


# --- registries: one list of names -----------------------------------------------------------------

def test_cli_choices_are_the_registries():
    from toolkit import cli
    from toolkit.runtime.registry import FORMATS as ARTIFACT_FORMATS

    assert [m.value for m in cli.ExportFormat] == list(names.EXPORT_FORMATS)
    assert [m.value for m in cli.Precision] == list(names.EXPORT_PRECISIONS)
    assert [m.value for m in cli.CalibMethod] == list(names.CALIB_METHODS)
    assert [m.value for m in cli.DatasetName] == list(names.DATASETS)
    for name in names.EXPORT_FORMATS:
        spec = format_spec(name)
        if spec.model_folder is None:  # a file format: name, readers and Triton platform from the registry
            assert spec.artifact in ARTIFACT_FORMATS and spec.backends
            assert spec.suffix("fp32") == ARTIFACT_FORMATS[spec.artifact].suffixes[0]


TOY_MODULE = '''
"""A throwaway export format: TorchScript bytes under a new suffix, read by the TorchScript runner."""
from export.pipeline import FormatSpec


def write(job, path):
    from export import torchscript

    return torchscript.export(job.model, job.card, path)


FORMAT = FormatSpec("toyfmt", write)
'''


@pytest.mark.slow
def test_a_new_format_is_a_module_and_two_registry_lines(ckpt, tmp_path, monkeypatch):
    """Plugging in a format: (1) its writer module, (2) one line in toolkit/names.py, (3) one artifact
    format (and the backend that reads it) in toolkit/runtime/registry.py. Nothing else changes:
    default names, verification, publishing and the CLI's --format choices follow."""
    from toolkit.runtime import registry

    (tmp_path / "toy_export_format.py").write_text(TOY_MODULE)  # file 1
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(names.EXPORT_FORMATS, "toy", "toy_export_format:FORMAT")  # file 2
    monkeypatch.setitem(registry.FORMATS, "toyfmt", registry.ArtifactFormat("toyfmt", (".toy",)))  # file 3
    backend = registry.BACKENDS["torchscript"]
    reads_toy = registry.Backend(backend.target, (*backend.reads, "toyfmt"))
    monkeypatch.setitem(registry.BACKENDS, "torchscript", reads_toy)

    result = run_export(ckpt, "toy", verify_samples=32)
    assert result.ok and result.path == ckpt.with_suffix(".toy") and result.verify.max_abs_diff < 1e-4
    assert result.size_bytes == result.path.stat().st_size
    from toolkit import cli
    export_commands = importlib.import_module("toolkit.cli.export")  # `toolkit.cli.export` is also a command

    def reload_cli() -> None:  # the CLI builds its --format choices from the registry at import time
        importlib.reload(export_commands)
        importlib.reload(cli)

    try:
        reload_cli()
        out = tmp_path / "cli_out"
        out.mkdir()
        cli_result = runner.invoke(cli.app, ["export", "-m", str(ckpt), "--format", "toy", "-o", str(out),
                                             "--verify-samples", "32"])
        assert cli_result.exit_code == 0, cli_result.output
        assert (out / "resnet20_digits.toy").is_file() and "verify passed" in cli_result.output
    finally:
        monkeypatch.undo()
        reload_cli()
    assert "toy" not in [m.value for m in cli.ExportFormat]


# --- typed options -------------------------------------------------------------------------------------

def test_unknown_options_name_the_valid_ones(ckpt):
    with pytest.raises(UsageError, match=r"does not take warp_speed; valid options: max_batch, min_batch"):
        run_export(ckpt, "tensorrt", warp_speed=9)
    with pytest.raises(UsageError, match=r"--format onnx does not take name; valid options: none"):
        run_export(ckpt, "onnx", name="x")
    from export.triton import TritonOptions

    with pytest.raises(UsageError, match="TritonOptions"):
        run_export(ckpt, "onnx", options=[TritonOptions(name="x")])
    with pytest.raises(UsageError, match="--max-batch must be >= 1"):
        run_export(ckpt, "tensorrt", max_batch=0)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name, ckpt.name + ".card.json"]


def test_cli_option_for_another_format_is_a_usage_error(ckpt):
    result = invoke("export", "-m", ckpt, "--format", "onnx", "--name", "digits")
    assert result.exit_code == 2 and "does not take name" in result.output
    assert "Traceback" not in result.output


def test_options_parse_flat_names_and_typed_instances():
    from export.triton import TritonOptions

    spec = format_spec("triton")
    triton, trt = pipeline.parse_options("triton", spec.options, {"max_batch": 8},
                                         [TritonOptions(name="digits", instance_count=2)])
    assert triton == TritonOptions(name="digits", instance_count=2, max_batch=8)
    assert trt == TensorRTOptions(max_batch=8)
    job = pipeline.ExportJob(checkpoint=Path("m.pt"), model=None, card=None, output=Path("x"),  # type: ignore[arg-type]
                             options=(triton, trt))
    assert job.option(TensorRTOptions).max_batch == 8 and job.option(TritonOptions).name == "digits"


# --- the phases: resolve -> build -> verify -> publish --------------------------------------------------

def test_resolve_checks_everything_and_draws_calibration_once(ckpt, sample_onnx_fp32):
    """Phase 1 reads no weights and writes nothing: flat names and a settings object are one thing, the
    int8 opset default applies, and the calibration images are drawn once (the quantiser reads the same
    object verification holds out)."""
    from export.pipeline import ExportSettings, resolve

    plan = resolve(ckpt, "onnx", settings=ExportSettings(calib_size=64), precision="int8",
                   calib_dataset="sample")
    assert plan.settings.precision == "int8" and plan.settings.calib_size == 64 and plan.onnx.opset == 19
    assert plan.int8.dataset.name == "sample-train" and plan.checks.name == "sample-test"
    assert plan.int8.calibration is plan.int8.calibration and len(plan.int8.calibration) == 64
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name, ckpt.name + ".card.json"]
    with pytest.raises(UsageError, match="`export` needs a training checkpoint"):
        resolve(sample_onnx_fp32, "onnx")


@pytest.mark.slow
def test_card_flags_reach_the_artifact(ckpt, tmp_path):
    from toolkit.card_layers import CardFlags
    from toolkit.runtime.registry import read_artifact

    flags = CardFlags.parse(mean="0.4,0.4,0.4", std="0.2,0.2,0.2")
    result = run_export(ckpt, "onnx", tmp_path / "flagged.onnx", card_flags=flags, verify_samples=32)
    assert result.ok and result.card.mean == (0.4, 0.4, 0.4)
    card, _ = read_artifact(result.path)
    assert card.mean == (0.4, 0.4, 0.4) and card.std == (0.2, 0.2, 0.2)


# --- data loss: where the output goes ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".ts")])
def test_output_folder_means_inside_it(ckpt, tmp_path, fmt, suffix):
    out = tmp_path / "exports"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    result = invoke("export", "-m", ckpt, "--format", fmt, "-o", out, "--opset", "17", "--no-verify")
    assert result.exit_code == 0, result.output
    after = snapshot(out)
    assert after.pop(f"resnet20_digits{suffix}")[:2] in (b"PK", b"\x08\x08", b"\x08\x07", b"\x08\x09")
    assert after == before  # nothing else added, changed or removed


@pytest.mark.slow
def test_a_folder_in_the_way_is_never_replaced(ckpt, tmp_path):
    blocker = tmp_path / "exports" / "resnet20_digits.onnx"  # a folder where the file would go
    blocker.mkdir(parents=True)
    (blocker / "precious.txt").write_text("mine")
    result = invoke("export", "-m", ckpt, "-o", blocker.parent, "--format", "torchscript", "--no-verify")
    assert result.exit_code == 0, result.output  # a .ts beside the folder: no clash
    result = invoke("export", "-m", ckpt, "-o", blocker.parent, "--opset", "17", "--no-verify")
    assert result.exit_code == 2 and "is a folder" in result.output, result.output
    assert snapshot(tmp_path / "exports") == {"resnet20_digits.onnx": None, "resnet20_digits.ts": ANY,
                                              "resnet20_digits.onnx/precious.txt": b"mine"}


def test_output_that_is_the_input_is_refused(ckpt, tmp_path):
    original = ckpt.read_bytes()
    hard_link = tmp_path / "link.onnx"
    os.link(ckpt, hard_link)
    symlink = tmp_path / "sym.onnx"
    symlink.symlink_to(ckpt)
    odd_path = ckpt.parent / ".." / ckpt.parent.name / ckpt.name
    for output in (ckpt, odd_path, hard_link, symlink):
        for fmt in ("onnx", "torchscript"):
            result = invoke("export", "-m", ckpt, "--format", fmt, "-o", output, "--opset", "17",
                            "--no-verify")
            assert result.exit_code == 2, (output, result.output)
            assert "is the input checkpoint" in result.output, (output, result.output)
    assert ckpt.read_bytes() == original and symlink.is_symlink()
    assert hard_link.stat().st_ino == ckpt.stat().st_ino
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name, ckpt.name + ".card.json"]


@pytest.mark.slow
def test_output_dot_touches_only_the_new_file(ckpt, monkeypatch):
    folder = ckpt.parent
    (folder / "resnet20_digits").mkdir()  # a folder named like the stem
    (folder / "resnet20_digits" / "x").write_text("x")
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    result = invoke("export", "-m", ckpt.name, "-o", ".", "--format", "torchscript", "--no-verify")
    assert result.exit_code == 0, result.output
    after = snapshot(folder)
    assert after.pop("resnet20_digits.ts") and after == before


def test_triton_refuses_a_model_folder_holding_the_checkpoint(ckpt, tmp_path):
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    inside = repo / "digits" / ckpt.name
    shutil.copy(ckpt, inside)
    result = invoke("export", "-m", inside, "--format", "triton", "-o", repo, "--name", "digits",
                    "--opset", "17",
                    "--no-verify")
    assert result.exit_code == 2 and "holds the input checkpoint" in result.output, result.output
    assert inside.read_bytes() == ckpt.read_bytes()


@pytest.mark.slow
def test_triton_into_an_existing_repository_changes_only_its_model(ckpt, tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git" / "refs").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".gitignore").write_text("*.failed-verify\n")
    (repo / "README.md").write_text("models we serve\n")
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    (repo / "other" / "1" / "model.onnx").write_bytes(b"\x08\x07 other model")
    (repo / "digits" / "3").mkdir(parents=True)  # an old version of the model we replace
    (repo / "digits" / "config.pbtxt").write_text("old")
    (repo / "dangling").symlink_to(tmp_path / "nowhere")
    before = snapshot(repo, skip="digits")
    inode = (repo / "other" / "1" / "model.onnx").stat().st_ino
    result = invoke("export", "-m", ckpt, "--format", "triton", "-o", repo, "--name", "digits",
                    "--opset", "17",
                    "--verify-samples", "32")
    assert result.exit_code == 0, result.output
    assert snapshot(repo, skip="digits") == before  # byte for byte, hidden files and links included
    assert (repo / "other" / "1" / "model.onnx").stat().st_ino == inode  # not even rewritten
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert 'name: "digits"' in (repo / "digits" / "config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "repo"]  # nothing beside the repository


# --- data loss: kills and leftovers ----------------------------------------------------------------------

@pytest.mark.slow
def test_next_export_restores_a_model_lost_between_the_two_renames(ckpt, tmp_path):
    """kill -9 between `rename(model, backup)` and `rename(new, model)` (the two-rename fallback) leaves
    the model under its backup name; the next export to it restores it before doing anything else."""
    repo = tmp_path / "repo"
    backup = repo / f".digits.old-{dead_pid()}-0a1b2c3d"
    (backup / "1").mkdir(parents=True)
    (backup / "config.pbtxt").write_text('name: "digits"  # the version we had\n')
    killed_stage = repo / f".digits.export-{dead_pid()}-0a1b2c3d"
    killed_stage.mkdir()
    (killed_stage / "digits").mkdir()
    # --atol 0: verification fails, so the old model must stay in place
    result = invoke("export", "-m", ckpt, "--format", "triton", "-o", repo, "--name", "digits",
                    "--opset", "17", "--atol", "0", "--rtol", "0", "--verify-samples", "16")
    assert result.exit_code == 1 and "verification failed" in result.output, result.output
    assert (repo / "digits" / "config.pbtxt").read_text() == 'name: "digits"  # the version we had\n'
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]  # backup restored, dead staging removed
    aside = tmp_path / "repo.failed-verify" / "digits"
    assert (aside / "config.pbtxt").is_file() and str(aside) in result.output.replace("\n", "")


@pytest.mark.slow
def test_stale_staging_of_a_killed_export_is_removed_but_not_a_live_one(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".resnet20_digits.ts.export-{dead_pid()}-0a1b2c3d"
    live = out / f".resnet20_digits.ts.export-{os.getppid()}-0a1b2c3d"  # a concurrent export (alive)
    legacy = out / ".resnet20_digits.ts.export-k3j_9x2a"  # an older version's staging, long dead
    other = out / f".other.onnx.export-{dead_pid()}-0a1b2c3d"  # not ours to judge
    for folder in (dead, live, legacy, other):
        folder.mkdir()
        (folder / "resnet20_digits.ts").write_bytes(b"partial")
    long_ago = time.time() - 2 * 3600
    os.utime(legacy, (long_ago, long_ago))
    result = invoke("export", "-m", ckpt, "--format", "torchscript", "-o", out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, other.name, "resnet20_digits.ts"])


# --- data loss: full disks -------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["staging", "write", "publish"])
def test_full_disk_is_one_line_and_nothing_partial(ckpt, tmp_path, monkeypatch, point):
    out = tmp_path / "out"
    out.mkdir()
    (out / "resnet20_digits.onnx").write_bytes(b"the previous export")
    before = snapshot(out)
    if point == "staging":
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if ".export-" in self.name:
                _enospc()
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    elif point == "write":
        import onnx

        real_save = onnx.save_model

        def save_model(proto, path, *args, **kwargs):
            Path(path).write_bytes(b"half an onnx")  # what a full disk leaves: a partial file
            _enospc()

        monkeypatch.setattr(onnx, "save_model", save_model)
        assert real_save is not save_model
    else:
        monkeypatch.setattr(os, "replace", _enospc)  # the renames that publish (toolkit/fileio.py)
    result = invoke("export", "-m", ckpt, "-o", out, "--opset", "17", "--no-verify")
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: no space left on {out}", result.output
    assert snapshot(out) == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 KB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    command = ["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)]
    made = subprocess.run(command, capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    filler = open(folder / "filler", "wb", buffering=0)  # noqa: SIM115 - closed below, after the error
    with filler, pytest.raises(OSError, match="No space") as full:  # noqa: PT012
        while filler.write(b"\x00" * 512):  # fill the filesystem until the write raises ENOSPC
            continue
    assert full.value.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free == 0


@pytest.mark.slow
@pytest.mark.parametrize("full", [True, False], ids=["0-free", "100k-free"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "triton"])
def test_real_full_filesystem(ckpt, tiny_disk, fmt, full):
    (tiny_disk / "keep.txt").write_text("mine")
    if full:
        _fill(tiny_disk)
    before = snapshot(tiny_disk)
    output = tiny_disk / ("repo" if fmt == "triton" else "")
    result = invoke("export", "-m", ckpt, "--format", fmt, "-o", output, "--opset", "17", "--no-verify")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no space left on ") and str(tiny_disk) in lines[0], lines
    after = snapshot(tiny_disk)
    after.pop("repo", None)  # the repository folder itself may have been created (empty)
    assert after == before


def test_no_space_error_is_a_toolkit_error():
    from toolkit.errors import ToolkitError

    assert issubclass(NoSpaceError, ToolkitError) and NoSpaceError("x").exit_code == 1


def test_format_spec_without_registry_entry_says_so():
    spec = FormatSpec("no-such-artifact", lambda job, path: path)
    with pytest.raises(ExportError, match=r"not in toolkit/runtime/registry\.py"):
        spec.suffix("fp32")
