"""predict(): every image format and mode, EXIF orientation, bad inputs, bombs; ONNX never imports torch."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from toolkit.evaluate import PredictInput, gather_inputs, predict, softmax
from toolkit.preprocess import preprocess

N_DIGITS = 6


@pytest.fixture(scope="module")
def runner(sample_onnx_runner):
    return sample_onnx_runner


@pytest.fixture(scope="module")
def digits(sample_test) -> np.ndarray:
    return sample_test.images[:N_DIGITS]


def reference(runner, images: np.ndarray) -> np.ndarray:
    return softmax(runner(preprocess(images, runner.card)))


def probs(result: dict) -> np.ndarray:
    out = np.zeros(10)
    for entry in result["top"]:
        out[entry["index"]] = entry["probability"]
    return out


LOSSLESS = {"png": {}, "bmp": {}, "tiff": {}, "webp": {"lossless": True}, "gif": {}}


@pytest.mark.parametrize("fmt", [*LOSSLESS, "jpeg"])
def test_formats(runner, digits, tmp_path, fmt):
    paths = []
    for i, image in enumerate(digits):
        path = tmp_path / f"d{i}.{fmt}"
        Image.fromarray(image).save(path, **LOSSLESS.get(fmt, {"quality": 95}))
        paths.append(path)
    results = predict(runner, paths, top_k=10)
    expected = reference(runner, digits)
    assert [r["input"] for r in results] == [str(p) for p in paths]
    got = np.stack([probs(r) for r in results])
    if fmt == "jpeg":
        assert (got.argmax(1) == expected.argmax(1)).all()
    else:  # lossless (digits are grey, so GIF's palette is exact too)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(abs(sum(t["probability"] for t in r["top"]) - 1) < 1e-6 for r in results)


def _16bit(image: Image.Image) -> Image.Image:
    wide = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(wide.astype("<u2"))  # Pillow picks I;16 for uint16


MODES = {
    "L": lambda im: im.convert("L"),
    "P": lambda im: im.convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
    "RGBA": lambda im: im.convert("RGBA"),
    "LA": lambda im: im.convert("LA"),
    "I;16": _16bit,
}


@pytest.mark.parametrize("mode", [*MODES, "CMYK"])
def test_modes_convert_to_the_same_pixels(runner, digits, tmp_path, mode):
    expected = reference(runner, digits)
    paths = []
    for i, image in enumerate(digits):
        rgb = Image.fromarray(image)
        if mode == "CMYK":
            path = tmp_path / f"d{i}.jpg"
            rgb.convert("CMYK").save(path, quality=100)
        else:
            path = tmp_path / f"d{i}.png"
            converted = MODES[mode](rgb)
            assert converted.mode == mode
            converted.save(path)
            if mode != "P":
                assert Image.open(path).mode == mode
        paths.append(path)
    got = np.stack([probs(r) for r in predict(runner, paths, top_k=10)])
    if mode == "CMYK":
        assert (got.argmax(1) == expected.argmax(1)).all()
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_exif_orientation_is_applied(runner, digits, tmp_path):
    upright = reference(runner, digits)
    tagged, untagged = [], []
    for i, image in enumerate(digits):
        # as a sideways camera would store it
        stored = Image.fromarray(image).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        stored.save(tmp_path / f"tag{i}.png", exif=exif)
        stored.save(tmp_path / f"raw{i}.png")
        tagged.append(tmp_path / f"tag{i}.png")
        untagged.append(tmp_path / f"raw{i}.png")
    with_tag = np.stack([probs(r) for r in predict(runner, tagged, top_k=10)])
    without = np.stack([probs(r) for r in predict(runner, untagged, top_k=10)])
    np.testing.assert_allclose(with_tag, upright, atol=1e-5)
    assert (without.argmax(1) != upright.argmax(1)).any()  # orientation matters for these digits


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (Pillow refuses it at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b""))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_bad_inputs_get_error_entries_and_the_rest_answers(runner, digits, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(digits[0]).save(good)
    big = Image.fromarray(np.repeat(np.repeat(digits[1], 8, 0), 8, 1))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.png").write_bytes(b"\x00" * 100)
    (tmp_path / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    names = ["truncated.jpg", "truncated.png", "notes.txt", "fake.png", "bomb.png"]
    results = predict(runner, [good, *(tmp_path / n for n in names)], top_k=3)
    assert "top" in results[0] and len(results[0]["top"]) == 3
    for name, result in zip(names, results[1:]):
        assert set(result) == {"input", "error"}, name
        assert name in result["error"]
    assert "too large" in results[-1]["error"]
    assert "error" in predict(runner, [PredictInput("gone.png", None, "no such file or folder: gone.png")])[0]


def test_gather_inputs_files_folders_globs_stdin_missing(tmp_path, digits):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/deeper/c.webp"):
        Image.fromarray(digits[0]).save(tmp_path / name)
    (tmp_path / "sub" / "readme.txt").write_text("skip me in folders")
    names = [i.name for i in gather_inputs([str(tmp_path / "sub")])]
    assert names == [str(tmp_path / "sub/b.jpg"), str(tmp_path / "sub/deeper/c.webp")]
    assert [i.name for i in gather_inputs([str(tmp_path / "*.png")])] == [str(tmp_path / "a.png")]
    assert len(gather_inputs([str(tmp_path / "**" / "*.*")])) == 4  # recursive glob, explicit files kept
    stdin = [f"{tmp_path / 'a.png'}\n", "\n", f"{tmp_path / 'nope.png'}\n"]
    items = gather_inputs(["-"], stdin)
    assert items[0].path == tmp_path / "a.png" and "nope.png" in items[1].error


def test_top_k_is_clamped_and_sorted(runner, digits, tmp_path):
    Image.fromarray(digits[0]).save(tmp_path / "a.png")
    (result,) = predict(runner, [tmp_path / "a.png"], top_k=50)
    p = [t["probability"] for t in result["top"]]
    assert len(p) == 10 and p == sorted(p, reverse=True)
    assert {t["class"] for t in result["top"]} == set(runner.card.class_names)


@pytest.mark.slow
def test_onnx_predict_and_eval_never_import_torch(sample_onnx_fp32, digits, tmp_path):
    Image.fromarray(digits[0]).save(tmp_path / "a.png")
    code = f"""
import sys, json
from typer.testing import CliRunner
from toolkit.cli import app
image = {str(tmp_path / 'a.png')!r}
r = CliRunner().invoke(app, ["predict", "-m", {str(sample_onnx_fp32)!r}, image, "-f", "json"])
assert r.exit_code == 0, r.output
json.loads(r.stdout)
r = CliRunner().invoke(app, ["predict", "-m", {str(sample_onnx_fp32)!r}, {str(tmp_path / 'a.png')!r}])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["eval", "-m", {str(sample_onnx_fp32)!r}, "--dataset", "sample", "--limit", "20",
                             "--output-dir", {str(tmp_path / 'out')!r}])
assert r.exit_code == 0, r.output
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))
print(json.dumps(bad))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "out" / "report.html").is_file()
