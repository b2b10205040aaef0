"""Tiny raw datasets on disk, in the format the real ones come in."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from deepopt.data import RAW_FILES


def write_tiny_idx_dataset(folder: Path, n_train: int, n_test: int) -> None:
    """Four gzipped IDX files of a balanced 10-class dataset with random 28x28 pixels."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=generator),
        "train_labels": torch.arange(n_train) % 10,
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=generator),
        "test_labels": torch.arange(n_test) % 10,
    }
    for role, tensor in tensors.items():
        dims = tuple(tensor.shape)
        header = struct.pack(f">I{len(dims)}I", 0x800 | len(dims), *dims)
        blob = header + tensor.to(torch.uint8).numpy().tobytes()
        (folder / f"{RAW_FILES[role]}.gz").write_bytes(gzip.compress(blob, mtime=0))


def gaussian_blobs(count: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten Gaussian blobs as ``count`` 1 x size x size float 'images' and their labels:
    learnable in a few epochs; made on the CPU, so the same data on every device."""
    centers = torch.randn(10, 1, size, size, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    images = centers[labels] + 0.8 * torch.randn(count, 1, size, size, generator=generator)
    return images, labels
