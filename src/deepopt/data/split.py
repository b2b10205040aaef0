"""The lecture's protocol, pure: a seeded, stratified subset and its validation part, and
the pixel statistics and normalization that turn uint8 images into the network's input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from deepopt.data.catalogue import NUM_CLASSES, RawData
from deepopt.errors import ConfigError, DataError

__all__ = [
    "Split",
    "class_counts",
    "image_shape",
    "normalize",
    "pixel_stats",
    "split_raw",
    "stratified_split",
]


@dataclass(frozen=True, eq=False)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28] (or [N, 3, 32, 32]), raw pixel values 0..255
    labels: torch.Tensor  # int64 [N], class indices 0..9


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder).

    Each part gets floor(total * w / sum); the units left over go to the largest
    fractional remainders, ties to the lowest index. Exact integer arithmetic, so the
    parts sum to ``total`` and never exceed their weight when total <= sum(weights).
    """
    weight_sum = sum(weights)
    if weight_sum == 0:
        return [0] * len(weights)
    parts = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    left = total - sum(parts)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        parts[index] += 1
    return parts


def stratified_split(
    labels: torch.Tensor, subset: int | None, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a seeded, stratified subset of ``labels`` and its held-out
    validation part, each sorted ascending and disjoint.

    Rounding: the subset (``subset`` images; None = all) is shared among the classes in
    proportion to their counts, and round-half-up(subset * val_fraction) validation images
    among the classes in proportion to their subset shares, both by largest remainder
    (ties to the lower class index). With the balanced 60,000 and 6,000 / 0.1 that is
    600 per class, 60 of them for validation: 5,400 / 600.
    Which images are drawn depends only on ``seed`` (one torch.Generator, classes in order).
    """
    labels = labels.to(torch.int64)
    available = int(labels.shape[0])
    total = available if subset is None else subset
    if total > available:
        raise ConfigError(
            f"data.train_subset: {subset} is more than the {available} training images "
            f"available; use at most {available}, or null for all"
        )
    if total < 1:
        raise ConfigError(f"data.train_subset: {subset} must be at least 1")
    n_val = math.floor(total * val_fraction + 0.5)
    if not 1 <= n_val < total:
        raise ConfigError(
            f"data.val_fraction: {val_fraction} of {total} images leaves {n_val} for "
            f"validation and {total - n_val} for training; both must be at least 1"
        )
    num_classes = int(labels.max()) + 1 if available else 0
    per_class = torch.bincount(labels, minlength=num_classes).tolist()
    subset_counts = _apportion(total, per_class)
    val_counts = _apportion(n_val, subset_counts)
    generator = torch.Generator().manual_seed(seed)
    train_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for cls, (take, n_cls_val) in enumerate(zip(subset_counts, val_counts, strict=True)):
        members = (labels == cls).nonzero().flatten()  # ascending file order
        chosen = members[torch.randperm(members.numel(), generator=generator)[:take]]
        val_parts.append(chosen[:n_cls_val])
        train_parts.append(chosen[n_cls_val:])
    train_idx = torch.cat(train_parts).sort().values
    val_idx = torch.cat(val_parts).sort().values
    return train_idx, val_idx


def split_raw(
    raw: RawData, subset: int | None, val_fraction: float, seed: int
) -> tuple[dict[str, Split], torch.Tensor, torch.Tensor]:
    """The prepared splits (train, val, test) of ``raw`` and the train and val indices into
    its training images: ``stratified_split``'s subset, labels as int64."""
    train_index, val_index = stratified_split(raw.train_labels, subset, val_fraction, seed)
    splits = {
        "train": Split(raw.train_images[train_index], raw.train_labels[train_index].long()),
        "val": Split(raw.train_images[val_index], raw.train_labels[val_index].long()),
        "test": Split(raw.test_images, raw.test_labels.long()),
    }
    return splits, train_index, val_index


def class_counts(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> list[int]:
    counts: list[int] = torch.bincount(labels.to(torch.int64), minlength=num_classes).tolist()
    return counts


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of uint8 pixels scaled to [0, 1].

    From exact integer sums over a histogram, rounded once: the same values (and
    meta.json bytes) whatever the thread count, which changes the order, and with it the
    last digits, of a float reduction.
    """
    counts = torch.bincount(images.flatten(), minlength=256).tolist()  # pixels per value
    count = sum(counts)
    total = sum(value * n for value, n in enumerate(counts))
    squares = sum(value * value * n for value, n in enumerate(counts))
    variance = Fraction(count * squares - total * total, (255 * count) ** 2)
    return total / (255 * count), math.sqrt(variance)


def normalize(images_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """float32 [N, 1, 28, 28] network input (x / 255 - mean) / std from uint8 [N, 28, 28]
    (or [N, C, H, W] from uint8 [N, C, H, W], e.g. CIFAR-10's [N, 3, 32, 32]).

    Written as (x - 255 mean) / (255 std): one conversion and two in-place passes.
    """
    if not std > 0.0:
        raise DataError(f"normalize: std must be positive, got {std}")
    grayscale = images_uint8.dim() == 3
    x = (images_uint8.unsqueeze(1) if grayscale else images_uint8).to(torch.float32)
    return x.sub_(255.0 * mean).div_(255.0 * std)


def image_shape(images: torch.Tensor) -> tuple[int, int, int]:
    """(channels, height, width) of uint8 images [N, H, W] (one channel) or [N, C, H, W]."""
    if images.dim() == 3:
        return (1, int(images.shape[1]), int(images.shape[2]))
    channels, height, width = (int(n) for n in images.shape[1:])
    return (channels, height, width)
