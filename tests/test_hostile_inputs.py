"""Issue 9's hostile inputs, built here: each class gets a bounded outcome, never a traceback or a hang.

Images (aspect ratio, pixel limit, formats, a little mutation fuzzing), CIFAR pickles (structure,
types, sizes, opcode-level bombs), devices and pipes, damaged checkpoints through every command,
and card values. Memory claims are measured in a subprocess with `resource.getrusage`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from toolkit.card import (
    MAX_CARD_DEPTH,
    MAX_CLASSES,
    CardError,
    ModelCard,
    json_depth,
    load_json_bounded,
    load_sidecar,
    sidecar_path,
)
from toolkit.cli import app
from toolkit.data import load_cifar, load_image_folder, safe_unpickle
from toolkit.errors import CheckpointError, DataError, ModelFormatError, ToolkitError
from toolkit.images import IMAGE_FORMATS, MAX_PIXELS, ImageTooLargeError, UnsupportedImageError, decode_image
from toolkit.paths import require_file
from toolkit.preprocess import to_uint8

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_CARD = ModelCard(arch="resnet50", class_names=("a", "b"))  # resize 256, crop 224


def child_peak_mb(code: str, timeout: float = 120) -> tuple[float, subprocess.CompletedProcess]:
    """Run `code` in a fresh interpreter; its own peak RSS in MB, read by the child from /proc
    (VmHWM: this program's memory since exec; ru_maxrss would carry over this big test process's
    peak through fork+exec, and RUSAGE_CHILDREN the largest child this process ever ran)."""
    report = ("\nprint('PEAK_KB', next(line.split()[1] for line in open('/proc/self/status') "
              "if line.startswith('VmHWM:')), file=__import__('sys').stderr)\n")
    done = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KB ")]
    assert peaks, f"the child did not finish: rc {done.returncode}\n{done.stderr[-2000:]}"
    return int(peaks[-1]) / 1024, done


def cli(*args: str, seconds: float = 120):
    """CliRunner in a thread with a deadline, so a regression that blocks on a FIFO fails, not hangs."""
    box: dict = {}
    def run() -> None:
        box["result"] = CliRunner().invoke(app, list(args))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"toolkit {' '.join(args)} still running after {seconds}s (blocked?)"
    result = box["result"]
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height (8-bit grey) with one tiny IDAT: a limit reads only the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def line_png(width: int, height: int) -> bytes:
    """A real, complete PNG of width x height (a grey gradient): ~1 KB for a million pixels."""
    values = (np.arange(width * height) % 251).astype(np.uint8).reshape(height, width)
    buffer = io.BytesIO()
    Image.fromarray(values, "L").save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


# --- images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1_000_000, 1), (1, 1_000_000)])
def test_extreme_aspect_ratio_costs_one_input_sized_image(tmp_path, size):
    path = tmp_path / "line.png"
    path.write_bytes(line_png(*size))
    assert path.stat().st_size < 20_000 and size[0] * size[1] < MAX_PIXELS
    code = (
        "from toolkit.card import ModelCard; from toolkit.images import decode_image; "
        "from toolkit.preprocess import to_uint8; "
        f"out = to_uint8(decode_image({str(path)!r}), ModelCard(arch='resnet50', class_names=('a',))); "
        "print(out.shape, out.dtype)"
    )
    peak, done = child_peak_mb(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(224, 224, 3) uint8"
    # the full resize would be 256,000,000 x 256 x 3 = 196 GB; the crop-only resize stays near
    # the interpreter's own size
    assert peak < 400, f"peak RSS {peak:.0f} MB"


def test_box_resize_stays_within_two_grey_levels_of_the_full_resize(monkeypatch):
    import toolkit.preprocess as preprocess

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 1200, 3), dtype=np.uint8))
    full = to_uint8(image, IMAGENET_CARD).astype(int)
    monkeypatch.setattr(preprocess, "MAX_RESIZE_PIXELS", 0)
    boxed = to_uint8(image, IMAGENET_CARD).astype(int)
    assert boxed.shape == full.shape == (224, 224, 3)
    assert np.abs(boxed - full).max() <= 2 and np.abs(boxed - full).mean() < 0.2


def test_pixel_limit_is_the_library_default_and_overridable(tmp_path):
    bomb = png_header_only(13_000, 13_000)  # 169 M pixels declared in 100 bytes
    with pytest.raises(ImageTooLargeError, match="169000000 pixels is over the limit of 50000000"):
        decode_image(bomb)
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000"):
        decode_image(line_png(40, 30), max_pixels=1000)  # the server's --max-pixels passes its own
    # folder eval decodes through the same default
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "bomb.png").write_bytes(bomb)
    dataset = load_image_folder(tmp_path)
    with pytest.raises(ImageTooLargeError):
        next(dataset.uint8_batches(IMAGENET_CARD, batch_size=4))


def test_decompression_bomb_warning_never_prints(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(13_000, 13_000))  # over Pillow's warning threshold (89 M pixels)
    code = (
        "from toolkit.images import decode_image\n"
        "for limit in (None, 200_000_000, 50_000_000):\n"
        "    try:\n"
        f"        decode_image({str(path)!r}, max_pixels=limit)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=ROOT,
                          timeout=60)
    assert "DecompressionBomb" not in done.stderr, done.stderr
    assert done.stdout.split() == ["UnsupportedImageError", "UnsupportedImageError", "ImageTooLargeError"]


def test_predict_reports_the_bomb_and_the_line_as_one_line_each(tmp_path, sample_model):
    (tmp_path / "bomb.png").write_bytes(png_header_only(13_000, 13_000))
    (tmp_path / "line.png").write_bytes(line_png(1_000_000, 1))
    result = cli("predict", "-m", str(sample_model), str(tmp_path / "bomb.png"), str(tmp_path / "line.png"),
                 "-f", "json")
    assert result.exit_code == 1
    answers = json.loads(result.stdout)
    assert "over the limit of 50000000" in answers[0]["error"]
    assert len(answers[1]["top"]) == 5


def _other_formats() -> dict[str, bytes]:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    blobs = {}
    for fmt, mode in (("DDS", "RGB"), ("BLP", "P"), ("SPIDER", "F"), ("PCX", "RGB"), ("TGA", "RGB"),
                      ("ICO", "RGB"), ("PPM", "RGB"), ("SGI", "RGB")):
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, fmt)
        blobs[fmt] = buffer.getvalue()
    return blobs


def test_formats_outside_the_list_are_refused_by_their_magic_bytes():
    for fmt, blob in _other_formats().items():
        with pytest.raises(UnsupportedImageError, match="not a recognised image file"):
            decode_image(blob, name=f"x.{fmt.lower()}")


def _allowed_formats() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    blobs = {}
    for fmt in IMAGE_FORMATS:
        buffer = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buffer, fmt)
        blobs[fmt] = buffer.getvalue()
    return blobs


def _mutations(blob: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        data = bytearray(blob)
        kind = rng.integers(4)
        if kind == 0:  # flip a few bytes
            for at in rng.integers(0, len(data), rng.integers(1, 8)):
                data[at] = int(rng.integers(256))
        elif kind == 1:  # truncate
            del data[int(rng.integers(1, len(data))):]
        elif kind == 2:  # insert junk
            at = int(rng.integers(len(data)))
            data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        else:  # overwrite a header-ish 4-byte field with an extreme value
            at = int(rng.integers(0, min(len(data) - 4, 64)))
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        yield bytes(data)


def test_mutation_fuzz_gives_images_or_toolkit_errors_only():
    rng = np.random.default_rng(9)
    blobs = {**_allowed_formats(), **_other_formats()}
    outcomes = {"decoded": 0, "refused": 0}
    for fmt, blob in blobs.items():
        for mutated in _mutations(blob, rng, 60):
            try:
                image = decode_image(mutated, name=fmt)
            except ToolkitError:
                outcomes["refused"] += 1
            else:
                assert image.mode == "RGB"
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0  # the corpus exercised both outcomes


# --- devices and pipes ------------------------------------------------------------------------------

def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_require_file_names_what_it_found(tmp_path):
    with pytest.raises(DataError, match="named pipe"):
        require_file(_fifo(tmp_path / "x.png"))
    with pytest.raises(DataError, match="a directory"):
        require_file(tmp_path)
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="character device"):
        require_file(tmp_path / "zero.pt", error=CheckpointError, what="checkpoint")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_pipes_and_devices_are_refused_by_every_command(tmp_path, sample_model):
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    _fifo(tmp_path / "model.onnx")
    _fifo(tmp_path / "x.png")
    for args in (["validate", "-m", str(tmp_path / "zero.pt")], ["info", "-m", str(tmp_path / "zero.pt")],
                 ["export", "-m", str(tmp_path / "zero.pt"), "-o", str(tmp_path / "out.onnx")],
                 ["info", "-m", str(tmp_path / "zero.onnx")], ["info", "-m", str(tmp_path / "model.onnx")]):
        result = cli(*args, seconds=60)
        assert result.exit_code == 1, (args, result.output)
        assert "not a regular file" in one_error_line(result)
    result = cli("predict", "-m", str(sample_model), str(tmp_path / "x.png"), "-f", "json", seconds=60)
    assert result.exit_code == 1 and "named pipe" in json.loads(result.stdout)[0]["error"]
    cifar = tmp_path / "cifar"
    _write_cifar(cifar)
    (cifar / "test_batch").unlink()
    _fifo(cifar / "test_batch")
    result = cli("eval", "-m", str(sample_model), "--dataset", "cifar10", "--data-dir", str(cifar),
                 seconds=60)
    assert result.exit_code == 1 and "named pipe" in one_error_line(result)


# --- CIFAR pickles ----------------------------------------------------------------------------------

def _write_cifar(folder: Path, batch: dict | None = None, meta: dict | None = None, rows: int = 6,
                 protocol: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    base = {b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8), b"labels": list(range(rows)),
            b"filenames": [b"a.png"] * rows}
    names = {b"label_names": [b"c%d" % i for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta if meta is not None else names, protocol))
    (folder / "test_batch").write_bytes(pickle.dumps(base if batch is None else batch, protocol))
    return folder


def _batch(**changes) -> dict:
    rng = np.random.default_rng(5)
    base = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4, 5]}
    for key, value in changes.items():
        if value is None and key.startswith("drop_"):
            base.pop(key[5:].encode())
        else:
            base[key.encode()] = value
    return base


BAD_BATCHES = {
    "no data": (_batch(drop_data=None), "no 'data'"),
    "no labels": (_batch(drop_labels=None), "no 'labels'"),
    "labels as strings": (_batch(labels=["cat"] * 6), "must hold integers"),
    "labels as None": (_batch(labels=[None] * 6), "must hold integers"),
    "label 2**70": (_batch(labels=[2**70] + [0] * 5), "must hold integers"),
    "label out of range": (_batch(labels=[0, 1, 2, 3, 4, 10]), "labels outside 0..9"),
    "labels a number": (_batch(labels=7), "must be a list or an array"),
    "pixels over 255": (_batch(data=np.full((6, 3072), 300, dtype=np.int16)), "pixel values outside 0..255"),
    "pixels as strings": (_batch(data=np.full((6, 3072), "x")), "must hold integers"),
    "pixels as floats": (_batch(data=np.zeros((6, 3072), dtype=np.float32)), "must hold integers"),
    "pixel rows as lists of str": (_batch(data=[["x"] * 3072] * 6), "must hold integers"),
    "rows of the wrong width": (_batch(data=np.zeros((6, 100), dtype=np.uint8)),
                                r"expected shape \(N, 3072\)"),
    "more labels than images": (_batch(labels=[0] * 7), "7 labels for 6 images"),
    "fewer labels than images": (_batch(labels=[0] * 5), "5 labels for 6 images"),
    "object array": (_batch(data=np.array([[None] * 3072] * 6, dtype=object)), "must hold integers"),
    "a list, not a dict": ([1, 2, 3], "found list"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_malformed_cifar_batches_are_named(tmp_path, case):
    batch, message = BAD_BATCHES[case]
    folder = _write_cifar(tmp_path / "c", batch=batch)
    with pytest.raises(DataError, match=message):
        load_cifar(folder, "cifar10")


@pytest.mark.parametrize("meta, message", [
    ({b"names": [b"a"]}, "no 'label_names'"),
    ({b"label_names": 5}, "must be a list of 1..100000 class names"),
    ({b"label_names": [1, 2]}, "must hold strings"),
    ({b"label_names": []}, "must be a list of 1..100000"),
])
def test_malformed_cifar_meta_is_named(tmp_path, meta, message):
    folder = _write_cifar(tmp_path / "c", meta=meta)
    with pytest.raises(DataError, match=message):
        load_cifar(folder, "cifar10")


def test_cifar_label_count_mismatch_fails_the_cli_with_one_line(tmp_path, sample_model):
    rng = np.random.default_rng(6)
    folder = _write_cifar(tmp_path / "c", batch={b"data": rng.integers(0, 256, (360, 3072), dtype=np.uint8),
                                                 b"labels": [0] * 400})
    result = cli("eval", "-m", str(sample_model), "--dataset", "cifar10", "--data-dir", str(folder))
    assert result.exit_code == 1 and "400 labels for 360 images" in one_error_line(result)


def test_a_directory_in_place_of_a_batch(tmp_path):
    folder = _write_cifar(tmp_path / "c")
    (folder / "test_batch").unlink()
    (folder / "test_batch").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_cifar(folder, "cifar10")


def test_empty_values_and_zero_rows_are_data_not_payloads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, batch=_batch(filenames=[b""] * 6))  # protocol 2 writes b"" as builtins.bytes()
    assert len(load_cifar(tmp_path, "cifar10")) == 6
    empty = {b"data": np.zeros((0, 3072), dtype=np.uint8), b"labels": [], b"filenames": []}
    (folder / "data_batch_1").write_bytes(pickle.dumps(_batch(), 2))
    (folder / "data_batch_2").write_bytes(pickle.dumps(empty, 2))
    train = load_cifar(tmp_path, "cifar10", "train")
    assert len(train) == 6 and train.images.shape == (6, 32, 32, 3)


def _binbytes8_claiming(size: int) -> bytes:
    # {b"data": <BINBYTES8 claiming `size` bytes, holding 4>}
    return (b"\x80\x04}q\x00C\x04data" + b"\x8e" + struct.pack("<Q", size) + b"abcd" + b"s.")


def _memo_put_at(index: int) -> bytes:
    return b"\x80\x02}r" + struct.pack("<I", index) + b"."


def _shared_rows(rows: int) -> bytes:
    """{"data": [row] * rows, "labels": [0] * rows}: one 3072-value row referenced `rows` times."""
    buffer = io.BytesIO()
    pickle.Pickler(buffer, 2).dump({b"data": [[7] * 3072] * rows, b"labels": [0] * rows})
    return buffer.getvalue()


@pytest.mark.parametrize("payload, message", [
    (_binbytes8_claiming(1 << 40), "expected 1099511627776 bytes"),
    (_memo_put_at(2**31), "memo index 2147483648 out of range"),
    (b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x40\x85R.", "refusing bytes\\(n\\)"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85C\x01b\x87R.",
     "refusing an array rebuild"),
])
def test_opcode_level_bombs_are_refused_before_allocating(tmp_path, payload, message):
    path = tmp_path / "test_batch"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        safe_unpickle(path)


@pytest.mark.slow
def test_shared_references_cannot_expand_a_small_file(tmp_path):
    path = _write_cifar(tmp_path / "c") / "test_batch"
    path.write_bytes(_shared_rows(1_000_000))  # 4 MB on disk, 3 GB as an array
    assert path.stat().st_size < 5_000_000
    code = (
        "from toolkit.data import load_cifar\n"
        "try:\n"
        f"    load_cifar({str(path.parent)!r}, 'cifar10')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    peak, done = child_peak_mb(code)
    assert "DataError" in done.stdout, done.stdout + done.stderr
    assert "expands beyond the file's size" in done.stdout
    assert peak < 500, f"peak RSS {peak:.0f} MB"


def test_a_legitimate_list_of_rows_still_loads(tmp_path):
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 256, (4, 3072)).tolist()
    folder = _write_cifar(tmp_path / "c", batch={b"data": rows, b"labels": [1, 2, 3, 4]})
    dataset = load_cifar(folder, "cifar10")
    np.testing.assert_array_equal(dataset.images.transpose(0, 3, 1, 2).reshape(4, -1), np.array(rows))


# --- damaged checkpoints through every command ---------------------------------------------------

def _damaged_checkpoints(sample_model: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    import torch
    from safetensors.torch import save_file

    state = torch.load(sample_model, weights_only=True)
    cases: dict[str, tuple[dict | None, str]] = {
        "conv of the wrong shape": ({**state, "layer1.0.conv1.weight": torch.zeros(16, 16, 5, 5)},
                                    "layer1.0.conv1.weight: expected [16, 16, 3, 3], found [16, 16, 5, 5]"),
        "fc claiming 10^6 classes, zero bytes": ({**state, "fc.weight": torch.zeros(10**6, 0)},
                                                 "claims 1000000 classes"),
        "stride-0 fc claiming 10^9 classes": ({**state, "fc.weight": torch.zeros(1).expand(10**9, 64)},
                                              "claims 1000000000 classes"),
        "stride-0 conv claiming 10^10 elements": (
            {**state, "layer2.0.conv2.weight": torch.zeros(1).expand(10**5, 10**5, 1, 1)},
            "layer2.0.conv2.weight: expected [32, 32, 3, 3], found [100000, 100000, 1, 1]"),
        "a non-string key": ({**state, 5: torch.zeros(3)}, "tensor names must be strings"),
        "a sparse tensor": ({**state, "fc.bias": state["fc.bias"].to_sparse()}, "sparse"),
        "input size 20000 in the card": ({"state_dict": state, "toolkit_card": {
            "arch": "resnet20", "class_names": list("abcdefghij"), "input_size": [3, 20000, 20000],
            "resize_size": 20000}}, "over the limit of 4096"),
        "mean as text in the card": ({"state_dict": state, "toolkit_card": {
            "arch": "resnet20", "class_names": list("abcdefghij"), "mean": "abc"}},
            "mean must be a list of numbers"),
    }
    out = {}
    for name, (obj, message) in cases.items():
        path = folder / (name.replace(" ", "_").replace("^", "") + ".pt")
        torch.save(obj, path)
        out[name] = (path, message)
    empty_head = {k: v.contiguous() for k, v in state.items()}
    empty_head["fc.weight"] = torch.zeros(10**9, 0)
    save_file(empty_head, folder / "claims.safetensors")
    out["safetensors [1e9, 0] head"] = (folder / "claims.safetensors", "claims 1000000000 classes")
    return out


@pytest.mark.slow
def test_damaged_checkpoints_give_one_line_in_validate_export_and_info(tmp_path, sample_model):
    for name, (path, message) in _damaged_checkpoints(sample_model, tmp_path).items():
        for args in (["export", "-m", str(path), "-o", str(tmp_path / "out.onnx"), "--no-verify"],
                     ["info", "-m", str(path)]):
            result = cli(*args)
            assert result.exit_code == 1, (name, args, result.output)
            assert message in one_error_line(result), (name, args, result.output)
        result = cli("validate", "-m", str(path), "--json")
        assert result.exit_code == 1, (name, result.output)
        data = json.loads(result.stdout)
        assert not data["valid"] and any(message in p["message"] for p in data["problems"]), (name, data)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_claimed_sizes_stay_bounded_in_memory(tmp_path, sample_model):
    cases = _damaged_checkpoints(sample_model, tmp_path)
    names = ("stride-0 fc claiming 10^9 classes", "stride-0 conv claiming 10^10 elements",
             "safetensors [1e9, 0] head")
    paths = [str(cases[name][0]) for name in names]
    code = (
        "from toolkit.validate import validate_checkpoint\n"
        f"for path in {paths!r}:\n"
        "    print(validate_checkpoint(path).valid)\n"
    )
    peak, done = child_peak_mb(code, timeout=300)
    assert done.stdout.split() == ["False"] * 3, done.stdout + done.stderr
    assert peak < 1500, f"peak RSS {peak:.0f} MB"  # torch itself is ~700 MB here; before: past 4 GB


# --- card values --------------------------------------------------------------------------------

GOOD_CARD = {"arch": "resnet20", "class_names": ["a", "b"], "input_size": [3, 32, 32], "resize_size": 32}


@pytest.mark.parametrize("changes, message", [
    ({"class_names": 5}, "class_names must be a list of strings"),
    ({"class_names": [["a"], "b"]}, "class_names must be a list of strings"),
    ({"num_classes": "ten"}, "num_classes must be an integer"),
    ({"num_classes": 3}, "num_classes=3"),
    ({"mean": "abc"}, "mean must be a list of numbers"),
    ({"mean": [0.5, "x", 0.5]}, "mean must be a list of numbers"),
    ({"std": [1, 1]}, "std needs 3 numbers"),
    ({"input_size": ["3", 32, 32]}, "input_size must be a list of integers"),
    ({"input_size": [3, 20000, 20000], "resize_size": 20000}, "over the limit of 4096"),
    ({"input_size": [3, 10**9, 10**9], "resize_size": 10**9}, "over the limit of 4096"),
    ({"resize_size": "256"}, "resize_size must be an integer"),
    ({"resize_size": 10**6}, "resize_size must be 1..8192"),
    ({"interpolation": 3}, "interpolation must be a string"),
    ({"shortcut": "C"}, "shortcut must be A, B or null"),
    ({"arch": 7}, "arch must be a non-empty string"),
    ({"extra": 5}, "extra must be an object"),
    ({"class_names": ["x"] * (MAX_CLASSES + 1)}, "over the limit of 100000"),
])
def test_every_card_field_is_type_and_range_checked(changes, message):
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict({**GOOD_CARD, **changes})
    with pytest.raises(CardError, match=message):
        ModelCard.from_json(json.dumps({**GOOD_CARD, **changes}))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(token):
    text = json.dumps(GOOD_CARD)[:-1] + f', "mean": [{token}, 0.5, 0.5]}}'
    with pytest.raises(CardError, match=f"{token} is not valid JSON"):
        ModelCard.from_json(text)
    with pytest.raises(CardError, match="finite"):
        ModelCard.from_dict({**GOOD_CARD, "std": [float(token.lower().replace("infinity", "inf")), 1, 1]})


def test_json_size_and_depth_are_bounded_before_parsing():
    deep = '{"arch": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert json_depth(deep) == 100_001 and json_depth('{"a": "[[[\\"[["}') == 1
    with pytest.raises(CardError, match=f"nested 100001 levels deep, over the limit of {MAX_CARD_DEPTH}"):
        ModelCard.from_json(deep)
    with pytest.raises(CardError, match="over the limit of 10"):
        load_json_bounded("[" + "1," * 20 + "1]", max_bytes=10, max_depth=5)
    parsed = load_json_bounded('{"a": [1, {"b": "]]]"}]}', max_bytes=100, max_depth=3)
    assert parsed == {"a": [1, {"b": "]]]"}]}


def test_a_sidecar_that_is_a_fifo_or_huge_is_refused(tmp_path):
    artifact = tmp_path / "m.plan"
    _fifo(sidecar_path(artifact))
    with pytest.raises(CardError, match="named pipe"):
        load_sidecar(artifact)


def test_an_onnx_card_nested_100000_deep_is_malformed_in_info(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])])
    model = helper.make_model(graph)
    helper.set_model_props(model, {"toolkit.card": "[" * 100_000 + "]" * 100_000})
    onnx.save(model, tmp_path / "deep.onnx")
    result = cli("info", "-m", str(tmp_path / "deep.onnx"))
    assert result.exit_code == 1 and "nested 100000 levels deep" in one_error_line(result)


def test_card_errors_are_data_errors_for_every_reader():
    # every reader (ONNX metadata, TorchScript, sidecar, Triton config) catches DataError and names its file
    assert issubclass(CardError, DataError) and not issubclass(CardError, ModelFormatError)
