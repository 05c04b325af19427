"""Tiny CIFAR-10/100 folders in the official python format, built from any images."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, kind: str, images: np.ndarray, labels: np.ndarray, names: list[str],
                bytes_keys: bool = True) -> Path:
    """`root/cifar-10-batches-py` or `root/cifar-100-python` holding `images` (N, 32, 32, 3 uint8) as the test
    split and the first five as the train split. `bytes_keys` writes pickle protocol 2 with bytes keys, as the
    real download has; otherwise str keys at the newest protocol."""
    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    def text(names: list[str]) -> list[str] | list[bytes]:
        return [n.encode() for n in names] if bytes_keys else list(names)

    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    protocol = 2 if bytes_keys else pickle.HIGHEST_PROTOCOL
    files: dict[str, dict]
    if kind == "cifar10":
        files = {
            "batches.meta": {key("label_names"): text(names), key("num_vis"): 3072},
            "test_batch": {key("data"): data, key("labels"): labels.tolist(),
                           key("batch_label"): b"testing batch 1 of 1"},
            "data_batch_1": {key("data"): data[:5], key("labels"): labels[:5].tolist()},
        }
    else:
        files = {
            "meta": {key("fine_label_names"): text(names), key("coarse_label_names"): text(["all"])},
            "test": {key("data"): data, key("fine_labels"): labels.tolist(),
                     key("coarse_labels"): [0] * len(labels)},
            "train": {key("data"): data[:5], key("fine_labels"): labels[:5].tolist(),
                      key("coarse_labels"): [0] * 5},
        }
    for name, obj in files.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(obj, handle, protocol=protocol)
    return folder
