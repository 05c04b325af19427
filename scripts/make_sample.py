"""Build the sample dataset: scikit-learn's 1797 real handwritten digits as a CIFAR-10-format folder.

Each 8x8 digit (16 grey levels) is scaled to 0..255, upsampled to 32x32 with bicubic resampling and
stored as RGB, in the official CIFAR-10 python layout (data_batch_1, test_batch, batches.meta), so
the sample exercises exactly the same reader as real CIFAR. Split: stratified 80/20, seed 0.

    python scripts/make_sample.py   # needs scikit-learn (the `test` extra)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT = Path(__file__).resolve().parents[1] / "toolkit" / "sample" / "digits-batches-py"


def to_cifar_rows(images: np.ndarray) -> np.ndarray:
    rows = []
    for image in images:
        grey = Image.fromarray(np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8), "L")
        rgb = np.asarray(grey.resize((32, 32), Image.Resampling.BICUBIC).convert("RGB"))
        rows.append(rgb.transpose(2, 0, 1).reshape(-1))  # CIFAR rows: 1024 R, 1024 G, 1024 B
    return np.stack(rows).astype(np.uint8)


def main() -> None:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    OUT.mkdir(parents=True, exist_ok=True)
    batches = {"data_batch_1": (x_train, y_train), "test_batch": (x_test, y_test)}
    for name, (images, labels) in batches.items():
        payload = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                   b"data": to_cifar_rows(images),
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
        (OUT / name).write_bytes(pickle.dumps(payload, protocol=2))
    meta = {b"label_names": [str(i).encode() for i in range(10)], b"num_cases_per_batch": len(y_train),
            b"num_vis": 3072}
    (OUT / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    print(f"wrote {OUT}: {len(y_train)} train, {len(y_test)} test images")


if __name__ == "__main__":
    main()
