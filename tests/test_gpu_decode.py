"""Issue 12, decoding: the worker pool (order, one error per bad file, threads and processes), and the
GPU decode path's CPU-testable parts (routing JPEG vs other formats, the tensor resize vs PIL)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.card import ModelCard, preset
from toolkit.data import load_image_folder
from toolkit.decode_pool import DecodePool, default_workers, load_uint8, resolve_workers
from toolkit.errors import UsageError
from toolkit.images import UnsupportedImageError
from toolkit.preprocess import to_uint8

IMAGENET = ModelCard(arch="resnet50", **{**preset("imagenet"), "class_names": ("a", "b")})
SMALL = ModelCard(arch="resnet18", class_names=("a", "b"), input_size=(3, 40, 56), resize_size=48,
                  mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2))


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients with a few shapes: resampling differences stay small, as on real photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                for _ in range(3)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(14):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        fmt = "png" if i % 5 == 3 else "jpg"
        photo(120 + 7 * i, 90 + 3 * i, i).save(root / f"c{i % 2}" / f"img{i:02d}.{fmt}")
    return root


def _slow_square(x: int) -> int:
    import time

    time.sleep(0.002 * (x % 3))
    if x == 7:
        raise ValueError("seven")
    return x * x


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_pool_keeps_order_and_raises_at_the_bad_item(kind):
    with DecodePool(2, kind) as pool:
        results = pool.map(_slow_square, range(20), window=5)
        got = [next(results) for _ in range(7)]
        with pytest.raises(ValueError, match="seven"):
            next(results)
    assert got == [x * x for x in range(7)]


def test_workers_default_to_the_cores_and_refuse_zero():
    assert resolve_workers(None) == default_workers() >= 1
    with pytest.raises(UsageError, match="--workers"):
        resolve_workers(0)
    with pytest.raises(UsageError, match="kind"):
        DecodePool(1, "fiber")


@pytest.mark.parametrize("workers", [1, 3])
def test_folder_batches_equal_serial_decoding(folder, workers):
    data = load_image_folder(folder)
    expected = np.stack([load_uint8(p, SMALL) for p in data.paths])  # serially, in the main thread
    batches = list(data.uint8_batches(SMALL, 4, workers=workers))
    assert [len(b) for b in batches] == [4, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), expected)


@pytest.mark.slow
def test_a_bad_file_gets_its_own_error_in_threads_and_processes(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(6):
        photo(60, 50, i).save(tmp_path / "a" / f"{i}.jpg")
    (tmp_path / "a" / "3.jpg").write_bytes(b"not a jpeg at all")
    data = load_image_folder(tmp_path)
    with pytest.raises(UnsupportedImageError, match=r"3\.jpg"):
        list(data.uint8_batches(SMALL, 2, workers=2))
    load = functools.partial(load_uint8, card=SMALL)
    with DecodePool(2, "process") as pool, pytest.raises(UnsupportedImageError, match=r"3\.jpg"):
        list(pool.map(load, data.paths))


def test_predict_takes_workers(sample_onnx_runner, tmp_path):
    from toolkit.evaluate import predict

    for i in range(3):
        photo(40, 30, i).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    paths = sorted(tmp_path.iterdir())
    one = predict(sample_onnx_runner, paths, workers=1, batch_size=2)
    many = predict(sample_onnx_runner, paths, workers=3, batch_size=2)
    assert one == many and [("error" in r) for r in many] == [False, False, False, True]


# --- GPU decode path, CPU-testable parts -------------------------------------------------------------

def test_routing_sends_only_plain_jpegs_to_the_gpu(tmp_path):
    from toolkit.gpu_decode import gpu_eligible, is_jpeg

    def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        return buffer.getvalue()

    rgb = photo(80, 60, 0)
    assert gpu_eligible(encoded(rgb, "JPEG"), IMAGENET)
    assert gpu_eligible(encoded(rgb.convert("L"), "JPEG"), IMAGENET)
    assert not gpu_eligible(encoded(rgb.convert("CMYK"), "JPEG"), IMAGENET)
    for fmt in ("PNG", "BMP", "WEBP", "GIF"):
        data = encoded(rgb, fmt)
        assert not is_jpeg(data) and not gpu_eligible(data, IMAGENET), fmt
    assert not gpu_eligible(b"\xff\xd8\xff garbage", IMAGENET)  # damaged: the CPU path names it
    assert not gpu_eligible(encoded(rgb, "JPEG"), IMAGENET.replace(interpolation="lanczos"))
    assert not gpu_eligible(encoded(Image.new("RGB", (20_000, 3)), "JPEG"), IMAGENET)  # resize bound


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (300, 256), (160, 120)])
def test_tensor_resize_matches_pil(interpolation, size):
    from toolkit.gpu_decode import resize_crop_tensor

    card = IMAGENET.replace(interpolation=interpolation)
    image = photo(*size, seed=size[0])
    expected = to_uint8(image, card).astype(np.int16)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    got = resize_crop_tensor(tensor, card).numpy().astype(np.int16)
    assert got.shape == expected.shape == (224, 224, 3)
    diff = np.abs(got - expected)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3, (diff.mean(), diff.max())


def test_tensor_batches_on_cpu_route_and_order(folder):
    from toolkit.gpu_decode import tensor_uint8_batches

    data = load_image_folder(folder)
    cpu = np.concatenate(list(data.uint8_batches(SMALL, 5, workers=2)))
    batches = list(tensor_uint8_batches(data.paths, SMALL, 5, device="cpu", workers=2))
    assert [tuple(b.shape) for b in batches] == [(5, 40, 56, 3), (5, 40, 56, 3), (4, 40, 56, 3)]
    got = torch.cat(batches).numpy()
    pngs = [i for i, p in enumerate(data.paths) if p.suffix == ".png"]
    assert pngs and (got[pngs] == cpu[pngs]).all()  # other formats: the CPU path, bit for bit
    diff = np.abs(got.astype(np.int16) - cpu.astype(np.int16))
    assert diff.mean() < 2.0  # JPEGs: torchvision's decoder and resize vs Pillow's


@pytest.mark.slow
def test_decode_agreement_on_cpu(folder, tmp_path):
    from toolkit.archs import build_model
    from toolkit.gpu_decode import decode_agreement
    from toolkit.runtime.torch_runner import TorchRunner

    torch.manual_seed(0)
    runner = TorchRunner(build_model("resnet20", 2), SMALL.replace(arch="resnet20"), source="test")
    data = load_image_folder(folder)
    check = decode_agreement(runner, data, batch_size=4, limit=10)
    assert check["num_samples"] == 10 and 0.8 <= check["top1_agreement"] <= 1.0
    assert 0 < check["max_abs_diff"] < 1.0  # the decoders differ a little, not a lot


def test_eval_loop_feeds_uint8_to_runners_that_accept_it(sample_test, sample_card):
    """iterate_logits hands uint8 batches to `run_uint8` when the runner normalises on its device, and
    float32 batches otherwise; both give the same logits."""
    from toolkit.evaluate import collect_logits
    from toolkit.preprocess import preprocess
    from toolkit.runtime.base import Runner

    class Recording(Runner):
        backend = "recording"

        def __init__(self, accepts: bool) -> None:
            super().__init__(sample_card, source="test")
            self.accepts_uint8 = accepts
            self.seen: list[np.dtype] = []

        def run_uint8(self, images):
            self.seen.append(images.dtype)
            return super().run_uint8(images)

        def _infer(self, batch):
            self.seen.append(batch.dtype)
            return batch.mean(axis=(2, 3))[:, :1].repeat(sample_card.num_classes, 1) * np.arange(
                sample_card.num_classes, dtype=np.float32)

    data = sample_test.subset(50)
    plain, device_side = Recording(False), Recording(True)
    a, b = collect_logits(plain, data, 16), collect_logits(device_side, data, 16)
    np.testing.assert_array_equal(a, b)
    assert set(plain.seen) == {np.dtype(np.float32)}
    assert device_side.seen[::2] == [np.dtype(np.uint8)] * 4  # run_uint8, then the call it makes
    assert a.shape == (50, sample_card.num_classes)
    np.testing.assert_array_equal(a[:, 1], preprocess(data.images, sample_card).mean(axis=(2, 3))[:, 0])


@pytest.mark.gpu
def test_nvjpeg_path_agrees_with_the_cpu_path(folder):
    import torch

    from toolkit.gpu_decode import tensor_uint8_batches

    data = load_image_folder(folder)
    cpu = np.concatenate(list(data.uint8_batches(IMAGENET, 8)))
    gpu = torch.cat(list(tensor_uint8_batches(data.paths, IMAGENET, 8, device="cuda"))).cpu().numpy()
    assert np.abs(gpu.astype(np.int16) - cpu.astype(np.int16)).mean() < 2.0


# --- ONNX Runtime on the GPU: provider choice is testable without one --------------------------------

def test_ort_providers_for_trt_and_missing_providers(tmp_path):
    from toolkit.errors import BackendUnavailableError
    from toolkit.runtime.onnxruntime_runner import providers_for

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = providers_for("cuda:1", gpu, True, precision="fp16", trt_cache=tmp_path)
    assert [name for name, _ in chosen] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt = chosen[0][1]
    assert trt["device_id"] == 1 and trt["trt_engine_cache_enable"] and trt["trt_fp16_enable"]
    assert trt["trt_engine_cache_path"] == str(tmp_path) and not trt["trt_int8_enable"]
    assert providers_for("cuda", gpu, False) == [("CUDAExecutionProvider", {"device_id": 0})]
    with pytest.raises(BackendUnavailableError, match="--trt needs onnxruntime-gpu built with the TensorRT"):
        providers_for("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], True)
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        providers_for("cuda", ["CPUExecutionProvider"], None)
    with pytest.raises(UsageError, match="--trt needs --device cuda"):
        providers_for("cpu", gpu, True)


@pytest.mark.gpu
def test_ort_cuda_io_binding_matches_cpu(sample_onnx_fp32, sample_test, sample_onnx_runner):
    from toolkit.preprocess import preprocess
    from toolkit.runtime.registry import open_model

    batch = preprocess(sample_test.images[:64], sample_onnx_runner.card)
    with open_model(sample_onnx_fp32, device="cuda", use_tensorrt=False) as runner:
        got = np.concatenate([runner(batch), runner(batch[:10])])
    want = np.concatenate([sample_onnx_runner(batch), sample_onnx_runner(batch[:10])])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
