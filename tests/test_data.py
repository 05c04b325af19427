"""Data layer and preprocessing: safe CIFAR reading, the sample, and parity with torchvision transforms."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from toolkit.card import ModelCard
from toolkit.data import Dataset, balanced_indices, load_cifar, load_dataset, load_sample, safe_unpickle
from toolkit.errors import DataError, UsageError
from toolkit.preprocess import preprocess


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": Payload(marker)}))
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        safe_unpickle(tmp_path / "test_batch")
    assert not marker.exists()


def test_missing_cifar_says_where_files_go(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar(tmp_path, "cifar10")
    with pytest.raises(UsageError, match="--data-dir"):
        load_dataset("folder")


def test_sample_is_real_digits_in_cifar_format():
    train, test = load_sample("train"), load_sample("test")
    assert (len(train), len(test)) == (1437, 360)
    assert test.images.shape == (360, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.class_names == tuple(str(i) for i in range(10))
    assert np.bincount(test.labels).min() >= 34  # stratified split: every digit present
    # grey digits stored as RGB: the three channels agree, and strokes are bright on dark
    assert (test.images[..., 0] == test.images[..., 2]).all() and test.images.max() == 255


@pytest.mark.parametrize("size, interpolation",
                         [((50, 40), "bilinear"), ((300, 451), "bicubic"), ((32, 32), "bilinear")])
def test_preprocess_matches_torchvision_transforms(size, interpolation):
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    card = ModelCard(arch="resnet20", class_names=("a", "b"), input_size=(3, 32, 32), resize_size=36,
                     interpolation=interpolation, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    if image.size == (32, 32):  # images already at input size are used as they are
        reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(card.mean, card.std)])
    else:
        reference = transforms.Compose([
            transforms.Resize(card.resize_size, interpolation=InterpolationMode(interpolation)),
            transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(card.mean, card.std),
        ])
    ours = preprocess([image], card)
    assert ours.shape == (1, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], reference(image).numpy(), atol=1e-5)


def test_preprocess_arrays_equal_the_pil_path():
    card = ModelCard(arch="resnet20", class_names=("a",), input_size=(3, 32, 32), resize_size=32)
    images = load_sample("test").images[:5]
    from_pil = preprocess([Image.fromarray(i) for i in images], card)
    np.testing.assert_array_equal(preprocess(images, card), from_pil)


# --- --limit: a seeded, class-balanced subset (issue 18 item 6) ----------------------------------

def folder_like(counts: list[int]) -> Dataset:
    """A class-per-folder listing (sorted by class, as load_image_folder lists it); no files needed."""
    from pathlib import Path

    labels = np.repeat(np.arange(len(counts)), counts)
    paths = [Path(f"c{label}/{i:05d}.jpg") for i, label in enumerate(labels)]
    return Dataset("folder", tuple(f"c{i}" for i in range(len(counts))), labels, paths=paths)


def test_limit_draws_every_class_of_a_folder_in_its_order():
    data = folder_like([1000] * 10)
    picked = data.subset(2000)
    assert len(picked) == 2000 and np.bincount(picked.labels).tolist() == [200] * 10
    positions = [data.paths.index(p) for p in picked.paths[:50]] + [int(str(picked.paths[-1])[-9:-4])]
    assert positions == sorted(positions)  # the dataset's order among the chosen
    assert picked.sampling == "2000 of 10000 images, class-balanced (seed 0)"
    assert picked.ids() == data.subset(2000).ids()  # seeded: the same images every run
    assert picked.ids() != data.subset(2000, seed=1).ids()
    assert set(picked.ids()) <= set(data.ids())


def test_limit_fills_from_other_classes_when_one_runs_out():
    picked = folder_like([3, 50, 50]).subset(30)
    assert np.bincount(picked.labels).tolist() == [3, 14, 13]
    assert balanced_indices(np.array([0, 0, 1]), 5).tolist() == [0, 1, 2]


def test_limit_on_arrays_keeps_the_source_ids_and_pixels():
    sample = load_sample("test")
    picked = sample.subset(30)
    chosen = [int(name[len("sample-test["):-1]) for name in picked.ids()]
    assert np.array_equal(picked.images, sample.images[chosen])
    assert np.array_equal(picked.labels, sample.labels[chosen])
    assert np.bincount(picked.labels).tolist() == [3] * 10


def test_limit_without_labels_takes_the_first_and_says_so():
    data = Dataset("x", ("a",), None, np.zeros((10, 2, 2, 3), np.uint8))
    picked = data.subset(4)
    assert picked.ids() == ["x[0]", "x[1]", "x[2]", "x[3]"]
    assert picked.sampling == "4 of 10 images, the first ones (no labels to balance by)"


def test_limit_edges():
    data = folder_like([5, 5])
    assert data.subset(None) is data and data.subset(10) is data and data.sampling is None
    with pytest.raises(UsageError, match="--limit must be positive"):
        data.subset(0)
    aligned = data.subset(4).aligned_to(("c1", "c0"))
    assert aligned.sampling == "4 of 10 images, class-balanced (seed 0)"


# --- reading small image files whole (the decode pool's fast path) --------------------------------

def test_small_files_are_read_whole_and_others_streamed_or_refused(tmp_path):
    """One open/fstat/read for small regular files; None (so decode_image opens the path itself and
    names the problem) for large files, folders, FIFOs (never waited on) and missing files."""
    from toolkit.decode_pool import load_uint8, small_file_bytes

    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(small, quality=75)
    assert small_file_bytes(small) == small.read_bytes()
    assert small_file_bytes(small, limit=10) is None and small_file_bytes(tmp_path) is None
    assert small_file_bytes(tmp_path / "missing.jpg") is None
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert small_file_bytes(fifo) is None  # returns at once: O_NONBLOCK, then fstat says FIFO
    card = ModelCard(arch="resnet20", class_names=("a", "b"), input_size=(3, 32, 32), resize_size=32)
    with pytest.raises(DataError, match="named pipe"):
        load_uint8(fifo, card)
    with pytest.raises(DataError, match="not found"):
        load_uint8(tmp_path / "missing.jpg", card)
    assert load_uint8(small, card).shape == (32, 32, 3)

