"""Data layer and preprocessing: safe CIFAR reading, the sample, and parity with torchvision transforms."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from toolkit.card import ModelCard
from toolkit.data import load_cifar, load_dataset, load_sample, safe_unpickle
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
