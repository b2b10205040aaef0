"""The benchmark's data (the prepare stage's splits, kept in memory) and what every
contender is given (``Setup``) and leaves behind (``Outcome``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepopt.config import RunConfig
from deepopt.data import PreparedData, RawSource, normalize, prepare
from deepopt.training import evaluate_logits

from .common import REPO

EpochDone = Callable[[], None]
# runner(epochs, epoch_done): trains ``epochs`` epochs, calls epoch_done() after each.
Runner = Callable[[int, EpochDone], None]


@dataclass(frozen=True)
class BenchData:
    prepared: PreparedData
    source: RawSource
    train_index: torch.Tensor  # into the 60,000 training images
    val_index: torch.Tensor

    @property
    def train_count(self) -> int:
        return int(self.prepared.train.labels.shape[0])


def build_data(config: RunConfig, subset: int | None) -> BenchData:
    """The splits and meta.json ``deepopt prepare`` writes for ``config`` with ``subset``
    training images (None: all), kept in memory."""
    data = config.data.model_copy(update={"train_subset": subset})
    prepared = prepare(data, config.seed, root=REPO, download=False)
    return BenchData(prepared.data, prepared.source, prepared.train_index, prepared.val_index)


def test_tensors(data: PreparedData, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    memory = torch.channels_last if channels_last else torch.contiguous_format
    images = normalize(data.test.images, data.mean, data.std).contiguous(memory_format=memory)
    return images, data.test.labels


def test_accuracy(model: nn.Module, data: PreparedData, precision: str) -> float:
    """The benchmark's check of a contender's network, the same for every contender (not
    the evaluate stage's path, which section ``eval`` times)."""
    images, labels = test_tensors(data, channels_last=precision == "bf16")
    logits = evaluate_logits(model, images, 1000, precision)
    return float((logits.argmax(dim=1) == labels).float().mean())


@dataclass(frozen=True)
class Setup:
    """What every contender is given."""

    config: RunConfig  # the base run config of the benchmark (fp32, no early stopping)
    data: BenchData
    workdir: Path
    experiment_id: str

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size


@dataclass
class Outcome:
    """What a runner leaves behind besides its timings."""

    model: nn.Module | None = None
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
