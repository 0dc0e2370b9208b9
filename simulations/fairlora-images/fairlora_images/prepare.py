"""Rebuild ``assets/base_densenet.json``: the frozen base, pretrained on another task.

Run from the app folder (about a minute on one CPU core; needs Debian's
``dataset-fashion-mnist``)::

    python -m fairlora_images.prepare

The base is the MONAI DenseNet of ``model.py``, trained in full for 10-class
Fashion-MNIST classification on the pretraining slice (10,000 images of the train set,
chosen by a fixed seed; no site ever sees them, see ``data.py``), with the same MONAI
preprocessing and flips as the sites. Its class features transfer, but the sites' task
is binary with a rule that depends on a group the pixels do not show, so it needs
fine-tuning. Seeded, but not bit-reproducible: two rebuilds on the same software gave
different weights (test accuracy 0.850 and 0.855), so the committed file is the reference. The
weights are a safetensors file, stored base64-encoded in JSON so that Flower's app
bundle carries them (``model.py``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from fedlowrank.datasets import load_fashion_mnist
from fedlowrank.datasets.fashion_mnist import DEFAULT_ROOT

from .data import GroupImages, as_batch, pretrain_split, preprocess
from .model import BASE_WEIGHTS, DENSENET, densenet, write_weights


def pretrain(images: torch.Tensor, classes: np.ndarray, epochs: int, seed: int = 0, batch_size: int = 128) -> nn.Module:
    """Full training of the 10-class DenseNet with Adam and a cosine schedule."""
    torch.manual_seed(seed)
    model = densenet()
    data = GroupImages(images, classes, np.zeros(len(classes), dtype=np.int64), augment=True, seed=seed)
    batches = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, collate_fn=as_batch, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(batches))
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for x, y, _ in batches:
            loss = nn.functional.cross_entropy(model(x), y.long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(y)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(data):.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, classes: np.ndarray) -> float:
    """10-class accuracy (eval mode: BatchNorm on its running statistics)."""
    model.eval()
    predicted = torch.cat([model(images[i : i + 1024]).argmax(1) for i in range(0, len(images), 1024)])
    return float((predicted.numpy() == classes).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of Fashion-MNIST's *-idx*-ubyte.gz files")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=str(BASE_WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: reductions in one order, the same file every time
    train = load_fashion_mnist(args.root, "train")
    rows = np.sort(pretrain_split(len(train))[0])
    images, classes = preprocess(train.images[rows]), train.labels[rows]
    model = pretrain(images, classes, args.epochs)
    test = load_fashion_mnist(args.root, "test")
    print(f"pretraining images {len(rows)}; 10-class test accuracy {accuracy(model, preprocess(test.images), test.labels):.4f}")
    size = write_weights(args.out, model.state_dict(), {
        "description": "MONAI DenseNet, 10-class Fashion-MNIST on the pretraining slice (fairlora_images.prepare)",
        "densenet": repr(DENSENET),
        "pretraining_images": str(len(rows)),
        "epochs": str(args.epochs),
    })
    print(f"wrote {args.out} ({size:,} bytes)")


if __name__ == "__main__":
    main()
