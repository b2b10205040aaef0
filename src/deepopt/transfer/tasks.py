"""Transfer tasks: some classes of a data set, relabelled, split into a rank-by-rank
training pool, validation and test images (see ``deepopt.transfer``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deepopt.config import TransferTask
from deepopt.data import DATASETS, RawData, Split, locate_raw, normalize, read_raw
from deepopt.errors import ConfigError

__all__ = [
    "Task",
    "class_orders",
    "few_shot",
    "finetune_repeats",
    "load_task",
    "make_task",
    "seeded_pool",
    "select_classes",
    "split_digest",
    "task_digest",
    "task_tensors",
]


@dataclass(frozen=True, eq=False)
class Task:
    dataset: str
    classes: tuple[int, ...]  # the data set's class indices, in the task's label order
    class_names: list[str]
    train: Split  # rank by rank: see few_shot
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def select_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> Split:
    """The images of ``classes`` in file order, labelled by their position in ``classes``."""
    relabel = torch.full((256,), -1, dtype=torch.int64)
    relabel[torch.tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
    new_labels = relabel[labels.to(torch.int64)]
    keep = (new_labels >= 0).nonzero().flatten()
    return Split(images[keep], new_labels[keep])


def class_orders(labels: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """Each class's indices into ``labels`` in a seeded random order (one generator,
    classes in order, so the order of a class depends only on the seed and the file)."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().flatten()  # ascending file order
        orders.append(members[torch.randperm(members.numel(), generator=generator)])
    return orders


def make_task(
    raw: RawData,
    *,
    dataset: str,
    classes: Sequence[int],
    class_names: Sequence[str],
    train_per_class: int | None,
    val_per_class: int,
    seed: int,
    key: str,
) -> Task:
    """The task of ``classes``: ``val_per_class`` validation and ``train_per_class``
    training images per class (None: all the rest) from the training file, rank by rank.
    ``key`` names the config section in errors (transfer.source / transfer.target)."""
    pool = select_classes(raw.train_images, raw.train_labels, classes)
    orders = class_orders(pool.labels, len(classes), seed)
    available = min(order.numel() for order in orders)
    wanted = val_per_class + (train_per_class or 1)
    if available < wanted:
        raise ConfigError(
            f"{key}: a class of {dataset} has only {available} training images, fewer than "
            f"transfer.val_per_class + the training images per class ({wanted})"
        )
    train_count = available - val_per_class if train_per_class is None else train_per_class
    val_idx = torch.cat([order[:val_per_class] for order in orders]).sort().values
    # [train_count, classes] -> flattened rank by rank: the first k x classes are k per class
    ranks = torch.stack([o[val_per_class : val_per_class + train_count] for o in orders], dim=1)
    train_idx = ranks.flatten()
    return Task(
        dataset=dataset,
        classes=tuple(classes),
        class_names=[str(class_names[c]) for c in classes],
        train=Split(pool.images[train_idx], pool.labels[train_idx]),
        val=Split(pool.images[val_idx], pool.labels[val_idx]),
        test=select_classes(raw.test_images, raw.test_labels, classes),
    )


def load_task(
    task: TransferTask,
    *,
    root: Path,
    train_per_class: int | None,
    val_per_class: int,
    seed: int,
    key: str,
) -> Task:
    """``make_task`` on the raw files of ``task.dataset`` (found as the prepare stage finds
    them: ``<root>/<name>/``, Debian's Fashion-MNIST, a download)."""
    raw = read_raw(locate_raw(task.dataset, root))
    return make_task(
        raw,
        dataset=task.dataset,
        classes=task.classes,
        class_names=DATASETS[task.dataset].class_names,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        seed=seed,
        key=key,
    )


def task_digest(task: Task) -> str:
    """A hash of the task's images and labels (all three splits): what keys checkpoints."""
    digest = hashlib.sha256(f"{task.dataset}:{list(task.classes)}".encode())
    for split in (task.train, task.val, task.test):
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def task_tensors(split: Split, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's float input [N, C, H, W] and the labels of a split."""
    return normalize(split.images, mean, std), split.labels


def seeded_pool(train: Split, num_classes: int, seed: int) -> Split:
    """The training pool in ``seed``'s random order per class, rank by rank again: the
    labelled images a fine-tune seed draws (``few_shot`` of it), the same for every mode.
    Every class keeps as many images as the smallest has."""
    orders = class_orders(train.labels, num_classes, seed)
    count = min(order.numel() for order in orders)
    # [count, classes] -> flattened rank by rank, as make_task stores a pool
    ranks = torch.stack([order[:count] for order in orders], dim=1).flatten()
    return Split(train.images[ranks], train.labels[ranks])


def split_digest(split: Split) -> str:
    """A hash of a split's images and labels (a fine-tune's labelled set, in its order)."""
    digest = hashlib.sha256()
    digest.update(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def few_shot(train: Split, per_class: int, num_classes: int) -> Split:
    """The first ``per_class`` training images of every class of a rank-by-rank pool."""
    count = per_class * num_classes
    if count > train.labels.numel():
        raise ConfigError(
            f"transfer.target_sizes: {per_class} per class is more than the "
            f"{train.labels.numel() // num_classes} training images per class available"
        )
    return Split(train.images[:count], train.labels[:count])


def finetune_repeats(train_images: int, batch_size: int, min_batches: int) -> int:
    """Whole copies of a training set that give an epoch at least ``min_batches`` batches."""
    return max(1, math.ceil(min_batches * batch_size / train_images))
