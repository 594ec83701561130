"""Tiny MNIST-layout IDX files of random images, for data-set tests that need no real download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from rnnddp.data.batches import Split


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _idx_images(images: torch.Tensor) -> bytes:
    return struct.pack(">iiii", 0x00000803, len(images), 28, 28) + images.numpy().tobytes()


def _idx_labels(labels: torch.Tensor) -> bytes:
    return struct.pack(">ii", 0x00000801, len(labels)) + labels.to(torch.uint8).numpy().tobytes()


def write_idx(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = False) -> tuple[Split, Split]:
    """Four IDX files of random images with learnable labels (label = brightness decile), as MNIST names them."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = []
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images = random_images(n, seed)
        labels = (images.float().mean(dim=(1, 2)) / 256 * 10).long().clamp(0, 9)
        for kind, data in (("images-idx3", _idx_images(images)), ("labels-idx1", _idx_labels(labels))):
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
        splits.append(Split(images, labels))
    return splits[0], splits[1]
