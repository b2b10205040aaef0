"""What each contender of the epoch table runs (letters a..g, Keras' d in
``keras_contender``), all on the same model, data, batch size, optimizer and threads."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepopt import paths
from deepopt.config import OptimConfig, apply_overrides
from deepopt.data import DATASETS, RAW_FILES, RawSource, normalize
from deepopt.models import build_model
from deepopt.training.member import Member, fit_member, normalized_splits, train_tracked

from .common import CONTENDERS, FAST_TRAIN, BenchError
from .data import EpochDone, Outcome, Runner, Setup
from .keras_contender import keras_runner


def deepopt_runner(setup: Setup, name: str, train: dict[str, Any], out: Outcome) -> Runner:
    """deepopt's stage code: ``train_tracked`` with MLflow, checkpoints and progress."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        config = apply_overrides(setup.config, {"train": {**train, "epochs": epochs}})
        tensors = normalized_splits(setup.data.prepared)
        result = train_tracked(
            config,
            tensors,
            data_meta=setup.data.prepared.meta,
            experiment_id=setup.experiment_id,
            run_name=name,
            member=Member(replica=0, index=0, seed=config.seed),
            checkpoint_dir=paths.checkpoint_dir(setup.workdir / "checkpoints", name),
            on_epoch=lambda _state: epoch_done(),
        )
        out.model, out.precision = result.model, config.train.precision

    return run


def _sgd(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The benchmark's optimizer, written out as a plain script would."""
    assert optim.name == "nesterov" and optim.momentum is not None
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, nesterov=True)


def bare_runner(setup: Setup, out: Outcome) -> Runner:
    """The baseline: preloaded normalized tensors, a randperm, slicing, no extras."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        prepared, batch_size = setup.data.prepared, setup.batch_size
        torch.manual_seed(setup.config.seed)
        model = build_model(setup.config.model)
        optimizer = _sgd(model, setup.config.optim)
        images = normalize(prepared.train.images, prepared.mean, prepared.std)
        labels = prepared.train.labels
        val_images = normalize(prepared.val.images, prepared.mean, prepared.std)
        shuffle = torch.Generator().manual_seed(setup.config.seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(images), generator=shuffle)
            for begin in range(0, len(images), batch_size):
                index = order[begin : begin + batch_size]
                loss = nn.functional.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(val_images)
                out.extra["val_acc"] = float(
                    (logits.argmax(1) == prepared.val.labels).float().mean()
                )
            epoch_done()
        out.model = model

    return run


def _torchvision_root(source: RawSource, name: str, folder: Path) -> Path:
    """<folder>/<Class>/raw/ with the four uncompressed IDX files torchvision expects."""
    raw = folder / DATASETS[name].torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for role, stem in RAW_FILES.items():
        path = source.files[role]
        target = raw / stem
        if target.exists():
            continue
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as packed, open(target, "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked)
        else:
            target.symlink_to(path.resolve())
    return folder


def torchvision_runner(setup: Setup, out: Outcome) -> Runner:
    """pytorch/examples' mnist: a torchvision dataset, per-item transforms, a DataLoader."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        data, name = setup.data, setup.config.data.name
        root = _torchvision_root(data.source, name, setup.workdir / "torchvision")
        transform = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((data.prepared.mean,), (data.prepared.std,)),
            ]
        )
        dataset_class = getattr(datasets, DATASETS[name].torchvision_class)
        full = dataset_class(str(root), train=True, transform=transform)
        train_set = Subset(full, data.train_index.tolist())
        val_set = Subset(full, data.val_index.tolist())
        shuffle = torch.Generator().manual_seed(setup.config.seed)
        # The examples' CPU settings: no worker processes, no pinned memory.
        train_loader = DataLoader(
            train_set, batch_size=setup.batch_size, shuffle=True, generator=shuffle
        )
        val_loader = DataLoader(val_set, batch_size=1000)
        torch.manual_seed(setup.config.seed)
        model = build_model(setup.config.model)
        optimizer = _sgd(model, setup.config.optim)
        for _ in range(epochs):
            model.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images), labels)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, labels in val_loader:
                    correct += int((model(images).argmax(1) == labels).sum())
            out.extra["val_acc"] = correct / len(val_set)
            epoch_done()
        out.model = model

    return run


def fit_runner(
    setup: Setup, train: dict[str, Any], out: Outcome, *, compile: bool, channels_last: bool
) -> Runner:
    """(e) without tracking: deepopt's member fit (``fit_member``) on a ``torch.compile``d
    model, or with the network and its inputs in channels_last."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        config = apply_overrides(setup.config, {"train": {**train, "epochs": epochs}})
        tensors = normalized_splits(setup.data.prepared)
        if channels_last:
            # The measured alternative to models.layout's choice (which keeps a bf16 network
            # and its inputs NCHW): everything in channels_last.
            tensors = {
                name: (images.contiguous(memory_format=torch.channels_last), labels)
                for name, (images, labels) in tensors.items()
            }

        def prepare(model: nn.Module) -> list[dict[str, Any]]:
            """After ``set_training_layout``, before the optimizer is built."""
            if channels_last:
                model.to(memory_format=torch.channels_last)  # the measured alternative
            if compile:
                model.compile()  # in place: state_dict keys stay those of the plain model
            return [{"params": list(model.parameters())}]

        model, _ = fit_member(
            config,
            tensors,
            setup.data.prepared.meta,
            config.seed,
            start=None,
            on_epoch_end=lambda _state: epoch_done(),
            parallel=None,
            setup=prepare,
        )
        out.model, out.precision = model, config.train.precision

    return run


def make_runner(key: str, setup: Setup, out: Outcome, train: dict[str, Any], name: str) -> Runner:
    """The runner of contender ``key``, or "deepopt": ``train_tracked`` with ``train``."""
    if key == "deepopt":
        return deepopt_runner(setup, name, train, out)
    if key == "a":
        return deepopt_runner(setup, "bench-a-fp32", {"precision": "fp32"}, out)
    if key == "b":
        return bare_runner(setup, out)
    if key == "c":
        return torchvision_runner(setup, out)
    if key == "d":
        return keras_runner(setup, out)
    if key == "e":
        return deepopt_runner(setup, "bench-e-fast", FAST_TRAIN, out)
    if key == "f":
        return fit_runner(setup, FAST_TRAIN, out, compile=True, channels_last=False)
    if key == "g":
        return fit_runner(setup, FAST_TRAIN, out, compile=False, channels_last=True)
    raise BenchError(f"unknown contender {key!r}; choose from {', '.join(CONTENDERS)}")
