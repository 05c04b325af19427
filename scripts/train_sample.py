"""Train the bundled sample model: a CIFAR ResNet-20 (option A) on the sample digits, on CPU.

Fixed seed, SGD with momentum and cosine decay, random-crop augmentation; a few minutes on 2 cores.
Writes toolkit/sample/resnet20_digits.pt (a plain state_dict) and its sidecar card, and prints the
test accuracy quoted in the README.

    python scripts/train_sample.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.archs import build_model
from toolkit.card import ModelCard, sidecar_path
from toolkit.checkpoint import file_sha256
from toolkit.data import load_sample
from toolkit.fileio import atomic_path
from toolkit.preprocess import preprocess

OUT = Path(__file__).resolve().parents[1] / "toolkit" / "sample" / "resnet20_digits.pt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train, test = load_sample("train"), load_sample("test")
    pixels = train.images.reshape(-1, 3) / 255.0
    card = ModelCard(
        arch="resnet20", class_names=train.class_names, input_size=(3, 32, 32), resize_size=32,
        mean=tuple(float(v) for v in pixels.mean(0)), std=tuple(float(v) for v in pixels.std(0)),
        shortcut="A", extra={"trained_on": "toolkit sample (scikit-learn digits), train split"},
    )
    model = build_model("resnet20", card.num_classes, shortcut="A").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * int(np.ceil(len(train) / args.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.15)
    padded = np.pad(train.images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            dy, dx = rng.integers(0, 5, size=2)  # random 32x32 crop from the 2-pixel padded image
            images = padded[idx, dy:dy + 32, dx:dx + 32]
            x = torch.from_numpy(preprocess(np.ascontiguousarray(images), card))
            y = torch.from_numpy(train.labels[idx])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)",
              flush=True)

    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(preprocess(test.images, card)))
    accuracy = float((logits.argmax(1).numpy() == test.labels).mean())
    with atomic_path(OUT) as tmp:
        torch.save(model.state_dict(), tmp)
    extra = {**card.extra, "test_accuracy": round(accuracy, 4)}
    card.replace(source_sha256=file_sha256(OUT), extra=extra).save(sidecar_path(OUT))
    print(f"test accuracy {accuracy:.4f} on {len(test)} images; wrote {OUT}")


if __name__ == "__main__":
    main()
