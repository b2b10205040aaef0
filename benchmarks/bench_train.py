#!/usr/bin/env python
"""How fast deepopt trains the lecture's BN-CNN on this CPU, measured against baselines.

Run from the repository root (the README shows the latest table and the command):

    .venv/bin/python benchmarks/bench_train.py                # everything, ~12 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --quick        # the epoch table only, ~1 min
    .venv/bin/python benchmarks/bench_train.py --only epoch,eval --epochs 7

Sections (``--only``; default all): ``peak`` (fp32/bf16 matmul GFLOP/s), ``epoch`` (the
contenders below), ``eval`` (the 10,000 test images), ``speedrun`` (time to 91 % test
accuracy on the full Fashion-MNIST, ``benchmarks/speedrun.yaml``), ``scaling`` (epoch time
over training-set and batch size), ``cli`` (``deepopt --help``) and ``dvc`` (a no-op
``dvc repro`` of the real dvc.yaml in a scratch copy).

Contenders of ``epoch`` (``--contenders``), all on the same model (the lecture's BN-CNN,
``build_model``), the same data (the lecture's seeded 5,400 / 600 split), the same batch
size, optimizer (SGD 0.02 + Nesterov 0.9) and thread count:

  a  deepopt, its real stage code: ``train.train_tracked`` with MLflow (a store in a temp
     folder), per-epoch checkpoints and progress lines, fp32
  b  a bare PyTorch loop on preloaded tensors (the baseline)
  c  the pytorch/examples style: torchvision's dataset with per-item ToTensor/Normalize
     transforms through a DataLoader
  d  Keras 3 on the torch backend, the identical network and optimizer (if installed:
     ``pip install -e '.[bench]'``)
  e  deepopt's fastest configuration (``FAST_TRAIN``), also ``train_tracked`` with tracking
  f  (e) with ``torch.compile`` of the model: the steady epoch and the compile time
  g  (e) in the channels_last memory format: the layout choice, measured every run

One epoch = a pass over the training images plus an evaluation of the validation images
(every contender's fit reports val loss/accuracy per epoch, as the lecture's Keras fit).
Each contender runs in its own process and is released one epoch at a time: a warm-up epoch
each (imports, setup, kernel selection, compilation), then the timed epochs round robin
(a b c ... g a b c ...), so machine noise hits all alike. Medians are reported.

Compute efficiency = the model's training FLOPs (counted with torch.utils.flop_counter:
forward + backward per training image, forward per validation image) per second of epoch,
divided by the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from deepopt import tracking
from deepopt.config import ModelConfig, OptimConfig, RunConfig, apply_overrides
from deepopt.data import (
    DATASETS,
    NUM_CLASSES,
    RAW_FILES,
    PreparedData,
    RawSource,
    Split,
    locate_raw,
    normalize,
    pixel_stats,
    read_raw,
    split_raw,
)
from deepopt.models import build_model
from deepopt.train import Member, split_tensors, train_tracked
from deepopt.training import evaluate_logits

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SPEEDRUN_FILE = REPO / "benchmarks" / "speedrun.yaml"
SECTIONS = ("peak", "epoch", "eval", "speedrun", "scaling", "cli", "dvc")
CONTENDERS = {
    "a": "deepopt fp32 (tracking, checkpoints, progress)",
    "b": "bare PyTorch loop, preloaded tensors",
    "c": "pytorch/examples: torchvision + DataLoader",
    "d": "Keras 3, torch backend",
    "e": "deepopt fastest (tracking, checkpoints, progress)",
    "f": "deepopt fastest + torch.compile",
    "g": "deepopt fastest in channels_last",
}
# (e): deepopt's fastest configuration on this CPU, chosen from this benchmark's numbers.
FAST_TRAIN: dict[str, Any] = {"precision": "bf16"}
SPEEDRUN_ACCURACY = 0.91  # test accuracy the speedrun must reach
TARGETS_TEXT = {
    "a_vs_b": "(a) >= 0.95 x (b): tracking, checkpoints, progress cost < 5 %",
    "a_vs_d": "(a) >= 1.8 x (d)",
    "e_vs_b": "(e) >= 1.4 x (b)",
    "e_accuracy": "(e)'s bf16: test accuracy within 0.3 points of fp32, same seeds (speedrun)",
    "eval": "10,000 test images evaluated in < 0.5 s",
    "help": "deepopt --help < 0.3 s",
    "dvc": "no-op dvc repro < 3 s",
    "speedrun": f">= {SPEEDRUN_ACCURACY:.0%} test accuracy on the full Fashion-MNIST",
}


class BenchError(RuntimeError):
    """A contender or section failed; the message says which."""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------
# Data: the prepare stage's split, in memory (no files written)


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
    """The same splits ``deepopt prepare`` writes for ``config`` with ``subset`` training
    images (None: all), kept in memory."""
    name = config.data.name
    source = locate_raw(name, REPO / config.data.root, download=False)
    raw = read_raw(source)
    splits, train_index, val_index = split_raw(raw, subset, config.data.val_fraction, config.seed)
    mean, std = pixel_stats(splits["train"].images)
    digest = hashlib.sha256()
    for split in splits.values():
        digest.update(split.images.numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    meta = {"digest": digest.hexdigest(), "num_classes": NUM_CLASSES, "dataset": name}
    prepared = PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        meta=meta,
        mean=mean,
        std=std,
        class_names=list(DATASETS[name].class_names),
        num_classes=NUM_CLASSES,
    )
    return BenchData(prepared, source, train_index, val_index)


def test_tensors(data: PreparedData, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    memory = torch.channels_last if channels_last else torch.contiguous_format
    images = normalize(data.test.images, data.mean, data.std).contiguous(memory_format=memory)
    return images, data.test.labels


def test_accuracy(model: nn.Module, data: PreparedData, precision: str) -> float:
    images, labels = test_tensors(data, channels_last=precision == "bf16")
    logits = evaluate_logits(model, images, 1000, precision)
    return float((logits.argmax(dim=1) == labels).float().mean())


# ---------------------------------------------------------------------------------------
# Peak and FLOPs


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of one [size, size] @ [size, size] matmul."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.mm(a, b)  # warm-up: allocation and kernel selection
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best / 1e9


def model_flops(model_config: ModelConfig, image_shape: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs per image of a training step (forward + backward) and of an inference pass."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 50
    model = build_model(model_config, image_shape=image_shape)
    images = torch.randn(batch, *image_shape)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    with FlopCounterMode(display=False) as train_counter:
        nn.functional.cross_entropy(model(images), labels).backward()  # type: ignore[no-untyped-call]
    model.eval()
    with FlopCounterMode(display=False) as forward_counter, torch.inference_mode():
        model(images)
    return {
        "train_step": train_counter.get_total_flops() / batch,
        "forward": forward_counter.get_total_flops() / batch,
    }


def epoch_flops(flops: dict[str, float], train_count: int, val_count: int) -> float:
    return flops["train_step"] * train_count + flops["forward"] * val_count


# ---------------------------------------------------------------------------------------
# Interleaving: each contender in its own process, released one epoch at a time
#
# Processes, not threads: torch's OpenMP team of a non-main thread ran the lecture CNN's
# epoch 1.6x (fp32) to 2.3x (bf16) slower than the main thread on 2 cores, while every
# process here trains in its own main thread, as a user's script does.

EpochDone = Callable[[], None]
# runner(epochs, epoch_done): trains ``epochs`` epochs, calls epoch_done() after each.
Runner = Callable[[int, EpochDone], None]


@dataclass(frozen=True)
class Spec:
    """Everything a contender process needs to build its runner (picklable)."""

    runner: str  # a contender letter, or "deepopt" (train_tracked with ``train``)
    config: RunConfig
    subset: int | None  # the training subset of its data (data.train_subset)
    workdir: Path
    experiment_id: str
    threads: int
    epochs: int  # including the warm-up epoch
    train: dict[str, Any] = field(default_factory=dict)
    run_name: str = "bench"


def _contender_main(conn: Connection, spec: Spec) -> None:
    """A contender process: set up, then one epoch per "go"; its own seconds per epoch."""
    try:
        torch.set_num_threads(spec.threads)
        cfg = spec.config
        data = build_data(cfg, spec.subset)
        tracking.configure(spec.workdir)
        setup = Setup(cfg, data, spec.workdir, spec.experiment_id)
        out = Outcome()
        runner = make_runner(spec, setup, out)
        conn.send(("ready", None))
        conn.recv()
        started = [time.perf_counter()]

        def epoch_done() -> None:
            conn.send(("epoch", time.perf_counter() - started[0]))
            conn.recv()
            started[0] = time.perf_counter()

        runner(spec.epochs, epoch_done)
        accuracy = None
        if out.model is not None:
            accuracy = test_accuracy(out.model, data.prepared, out.precision)
        conn.send(("done", {"test_acc": accuracy, "val_acc": out.extra.get("val_acc")}))
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"))
    finally:
        conn.close()


class Lockstep:
    """A contender process that trains exactly one epoch per ``step()``.

    It waits between epochs, so at any moment only one contender computes.
    """

    def __init__(self, name: str, spec: Spec) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")  # no fork of an initialized OpenMP
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_contender_main, args=(child, spec), name=name, daemon=True
        )
        self._process.start()
        child.close()

    def _receive(self, expected: str) -> Any:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise BenchError(f"{self.name}: the contender process died") from None
        if kind == "error":
            raise BenchError(f"{self.name}: {value}")
        if kind != expected:
            raise BenchError(f"{self.name}: sent {kind!r} where {expected!r} was due")
        return value

    def ready(self) -> None:
        self._receive("ready")

    def step(self) -> float:
        """Seconds of the contender's next epoch, measured in its process."""
        self._conn.send("go")
        return float(self._receive("epoch"))

    def finish(self) -> dict[str, Any]:
        """Let the run end (final logging is not timed); its test and val accuracy."""
        self._conn.send("go")
        result: dict[str, Any] = self._receive("done")
        self._process.join()
        return result

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


@dataclass
class Timing:
    warmup: float
    epochs: list[float]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {"warmup_s": self.warmup, "epochs_s": self.epochs, "median_s": self.median}


def interleave(specs: dict[str, Spec], epochs: int, label: str) -> dict[str, Timing]:
    """Start every contender, then a warm-up epoch each, then ``epochs`` timed epochs
    round robin; the contenders' specs carry ``epochs + 1``."""
    steppers = {key: Lockstep(key, spec) for key, spec in specs.items()}
    try:
        for stepper in steppers.values():
            stepper.ready()  # imports and data loading overlap here, before any timing
        timings: dict[str, Timing] = {}
        for key, stepper in steppers.items():
            timings[key] = Timing(warmup=stepper.step(), epochs=[])
            say(f"  [{label}] warm-up {key}: {timings[key].warmup:.2f} s (load {load()})")
        for round_index in range(epochs):
            for key, stepper in steppers.items():
                timings[key].epochs.append(stepper.step())
            laps = "  ".join(f"{k} {t.epochs[-1]:.3f}" for k, t in timings.items())
            say(f"  [{label}] round {round_index + 1}/{epochs}: {laps} s (load {load()})")
        for key, stepper in steppers.items():
            timings[key].result = stepper.finish()
        return timings
    finally:
        for stepper in steppers.values():
            stepper.kill()


# ---------------------------------------------------------------------------------------
# The contenders


@dataclass
class Outcome:
    """What a runner leaves behind besides its timings."""

    model: nn.Module | None = None
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    config: RunConfig  # the base run config of the benchmark (fp32, no early stopping)
    data: BenchData
    workdir: Path
    experiment_id: str

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size


def deepopt_runner(setup: Setup, name: str, train: dict[str, Any], out: Outcome) -> Runner:
    """deepopt's stage code: ``train_tracked`` with MLflow, checkpoints and progress."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        config = apply_overrides(setup.config, {"train": {**train, "epochs": epochs}})
        tensors = split_tensors(setup.data.prepared, config.train.precision)
        result = train_tracked(
            config,
            tensors,
            data_meta=setup.data.prepared.meta,
            experiment_id=setup.experiment_id,
            run_name=name,
            member=Member(replica=0, index=0, seed=config.seed),
            checkpoint_dir=setup.workdir / "checkpoints" / name,
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


def keras_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("keras") is not None


def keras_runner(setup: Setup, out: Outcome) -> Runner:
    """The lecture's Keras ``build_nn`` on the torch backend, trained by ``model.fit``."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        os.environ["KERAS_BACKEND"] = "torch"
        import keras  # type: ignore[import-untyped]

        cfg, prepared = setup.config.model, setup.data.prepared
        assert cfg.name == "lecture_cnn" and setup.config.optim.momentum is not None
        keras.utils.set_random_seed(setup.config.seed)
        layers: list[Any] = [keras.Input((28, 28, 1))]  # Keras' default: channels last
        for channels, stride in zip(cfg.conv_channels, (2, 2, 1), strict=True):
            layers.append(
                keras.layers.Conv2D(
                    channels, 5, strides=stride, padding="same", use_bias=not cfg.batchnorm
                )
            )
            if cfg.batchnorm:
                layers.append(keras.layers.BatchNormalization())
            layers.append(keras.layers.Activation(cfg.activation))
        layers += [keras.layers.Flatten(), keras.layers.Dense(cfg.dense_units, use_bias=False)]
        if cfg.batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers += [keras.layers.Activation(cfg.activation), keras.layers.Dense(NUM_CLASSES)]
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=setup.config.optim.lr,
                momentum=setup.config.optim.momentum,
                nesterov=True,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

        def nhwc(split: Split) -> Any:
            return normalize(split.images, prepared.mean, prepared.std).permute(0, 2, 3, 1).numpy()

        class Pause(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                out.extra["val_acc"] = float((logs or {}).get("val_accuracy", math.nan))
                epoch_done()

        model.fit(
            nhwc(prepared.train),
            prepared.train.labels.numpy(),
            batch_size=setup.batch_size,
            epochs=epochs,
            validation_data=(nhwc(prepared.val), prepared.val.labels.numpy()),
            shuffle=True,
            verbose=2,  # one line per epoch, as deepopt's progress
            callbacks=[Pause()],
        )

    return run


def fit_runner(
    setup: Setup, train: dict[str, Any], out: Outcome, *, compile: bool, channels_last: bool
) -> Runner:
    """(e)'s loop, ``deepopt.training.fit`` without tracking, on a ``torch.compile``d model
    or in the channels_last layout (which deepopt's stages do not use)."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        from deepopt.optim import build_optimizer, build_schedule
        from deepopt.training import fit

        config = apply_overrides(setup.config, {"train": {**train, "epochs": epochs}})
        tensors = split_tensors(setup.data.prepared, config.train.precision)
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            tensors = {
                name: (images.contiguous(memory_format=torch.channels_last), labels)
                for name, (images, labels) in tensors.items()
            }
        optimizer = build_optimizer(model.parameters(), config.optim)
        steps = -(-len(tensors["train"][0]) // config.train.batch_size)
        schedule = build_schedule(optimizer, config.schedule, epochs=epochs, steps_per_epoch=steps)
        if compile:
            model.compile()  # in place: state_dict keys stay those of the plain model
        fit(
            model,
            optimizer,
            schedule,
            tensors["train"],
            tensors["val"],
            epochs=epochs,
            batch_size=config.train.batch_size,
            early_stop=config.early_stop,
            seed=config.seed,
            eval_batch_size=config.train.eval_batch_size,
            precision=config.train.precision,
            on_epoch_end=lambda _state: epoch_done(),
        )
        out.model, out.precision = model, config.train.precision

    return run


def make_runner(spec: Spec, setup: Setup, out: Outcome) -> Runner:
    key = spec.runner
    if key == "deepopt":
        return deepopt_runner(setup, spec.run_name, spec.train, out)
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


# ---------------------------------------------------------------------------------------
# Sections


@dataclass
class Bench:
    args: argparse.Namespace
    setup: Setup
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> BenchData:
        return self.setup.data

    def spec(self, runner: str, epochs: int, **fields: Any) -> Spec:
        """A contender on the benchmark's config and data, ``epochs`` + a warm-up epoch."""
        base: dict[str, Any] = {
            "runner": runner,
            "config": self.setup.config,
            "subset": self.setup.config.data.train_subset,
            "workdir": self.setup.workdir,
            "experiment_id": self.setup.experiment_id,
            "threads": self.args.threads,
            "epochs": epochs + 1,
        }
        return Spec(**{**base, **fields})


def section_peak(bench: Bench) -> dict[str, Any]:
    fp32 = max(matmul_gflops(torch.float32) for _ in range(2))
    bf16 = max(matmul_gflops(torch.bfloat16) for _ in range(2))
    say(f"peak: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s (load {load()})")
    return {"fp32_gflops": fp32, "bf16_gflops": bf16}


def section_epoch(bench: Bench) -> dict[str, Any]:
    keys = list(bench.args.contenders)
    if "d" in keys and not keras_available():
        say("  (d) skipped: keras is not installed (pip install -e '.[bench]')")
        keys.remove("d")
    timings = interleave(
        {key: bench.spec(key, bench.args.epochs) for key in keys}, bench.args.epochs, "epoch"
    )
    prepared = bench.data.prepared
    flops = model_flops(bench.setup.config.model, (1, 28, 28))
    per_epoch = epoch_flops(flops, bench.data.train_count, int(prepared.val.labels.shape[0]))
    rows: dict[str, Any] = {}
    for key, timing in timings.items():
        rows[key] = {
            "name": CONTENDERS[key],
            **timing.to_dict(),
            "samples_per_s": bench.data.train_count / timing.median,
            "gflops": per_epoch / timing.median / 1e9,
            "test_acc": timing.result.get("test_acc"),
            "val_acc": timing.result.get("val_acc"),
        }
    if "f" in rows:
        # The first epoch of (f) also compiles: its excess over a steady epoch.
        rows["f"]["compile_s"] = rows["f"]["warmup_s"] - rows["f"]["median_s"]
    return {
        "train_images": bench.data.train_count,
        "val_images": int(prepared.val.labels.shape[0]),
        "batch_size": bench.setup.batch_size,
        "flops_per_image": flops,
        "flops_per_epoch": per_epoch,
        "contenders": rows,
    }


def section_eval(bench: Bench) -> dict[str, Any]:
    """The test images through ``evaluate_logits`` (inference_mode, eval batches), per
    precision, memory layout (channels_last: as the evaluate stage runs it) and batch."""
    prepared = bench.data.prepared
    combos = [
        (precision, layout, batch)
        for precision in ("fp32", "bf16")
        for layout in ("channels_last", "nchw")
        for batch in bench.args.eval_batches
    ]
    torch.manual_seed(0)
    model = build_model(bench.setup.config.model).eval()
    count = bench.args.eval_images
    inputs = {
        "nchw": test_tensors(prepared, channels_last=False)[0][:count],
        "channels_last": test_tensors(prepared, channels_last=True)[0][:count],
    }
    models = {
        "nchw": model,
        "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last),
    }
    times: dict[tuple[str, str, int], list[float]] = {combo: [] for combo in combos}
    for precision, layout, batch in combos:  # warm-up: oneDNN picks and caches its kernels
        evaluate_logits(models[layout], inputs[layout], batch, precision)
    for _ in range(bench.args.eval_rounds):
        for combo in combos:
            precision, layout, batch = combo
            tic = time.perf_counter()
            evaluate_logits(models[layout], inputs[layout], batch, precision)
            times[combo].append(time.perf_counter() - tic)
    rows = [
        {
            "precision": precision,
            "layout": layout,
            "batch_size": batch,
            "median_s": statistics.median(times[(precision, layout, batch)]),
            "runs_s": times[(precision, layout, batch)],
            "images": len(inputs[layout]),
        }
        for precision, layout, batch in combos
    ]
    for row in rows:
        say(
            f"  eval {row['precision']} {row['layout']} batch {row['batch_size']}: "
            f"{row['median_s']:.3f} s"
        )
    return {"rows": rows, "load": load()}


def speedrun_config(base: RunConfig, path: Path) -> RunConfig:
    with open(path, encoding="utf-8") as handle:
        overrides = yaml.safe_load(handle) or {}
    return apply_overrides(base, overrides, prefix=path.name)


def timed_tracked_run(
    bench: Bench, config: RunConfig, data: BenchData, name: str, seed: int
) -> dict[str, Any]:
    """One deepopt run, start to end (MLflow run, checkpoints, final logging), then test."""
    tic = time.perf_counter()
    tensors = split_tensors(data.prepared, config.train.precision)
    result = train_tracked(
        config,
        tensors,
        data_meta=data.prepared.meta,
        experiment_id=bench.setup.experiment_id,
        run_name=name,
        member=Member(replica=seed - config.seed, index=0, seed=seed),
        checkpoint_dir=bench.setup.workdir / "checkpoints" / f"{name}-{seed}",
    )
    accuracy = test_accuracy(result.model, data.prepared, config.train.precision)
    wall = time.perf_counter() - tic
    history = result.fit.history
    say(
        f"  [{name}] seed {seed}: {wall:.1f} s, {result.fit.epochs_run} epochs, "
        f"val_acc {history[-1]['val_acc']:.4f}, test_acc {accuracy:.4f} (load {load()})"
    )
    return {
        "seed": seed,
        "wall_s": wall,
        "train_s": result.fit.train_seconds,
        "epochs": result.fit.epochs_run,
        "val_acc": history[-1]["val_acc"],
        "test_acc": accuracy,
        "val_acc_per_epoch": [r["val_acc"] for r in history],
    }


def section_speedrun(bench: Bench) -> dict[str, Any]:
    """benchmarks/speedrun.yaml on its data, seeds seed..seed+n-1, and the same in fp32.

    The fp32 runs use the same seeds: bf16's accuracy cost is the mean of the per-seed
    differences, since one pair alone differs by up to ~0.3 points from float rounding
    (the fp32 run of seed 4487 gave 0.9105 and 0.9090 with two convolution layouts).
    """
    config = speedrun_config(bench.setup.config, bench.args.speedrun)
    data = build_data(config, config.data.train_subset)
    seeds = [config.seed + r for r in range(bench.args.speedrun_seeds)]
    runs = [timed_tracked_run(bench, config, data, "speedrun", seed) for seed in seeds]
    references = []
    if config.train.precision != "fp32" and not bench.args.quick:
        fp32 = apply_overrides(config, {"train": {"precision": "fp32"}})
        references = [timed_tracked_run(bench, fp32, data, "speedrun-fp32", s) for s in seeds]
    return {
        "config": config.model_dump(mode="json"),
        "train_images": data.train_count,
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_test_acc": statistics.median(r["test_acc"] for r in runs),
        "fp32_references": references,
    }


def bf16_accuracy_gap(speedrun: dict[str, Any]) -> float | None:
    """Mean test-accuracy difference (points) of the speedrun's runs minus fp32's, seed by
    seed; None without fp32 runs."""
    pairs = zip(speedrun["runs"], speedrun.get("fp32_references") or [], strict=False)
    gaps = [(fast["test_acc"] - fp32["test_acc"]) * 100 for fast, fp32 in pairs]
    return statistics.mean(gaps) if gaps else None


def section_scaling(bench: Bench) -> dict[str, Any]:
    """deepopt's epoch time over training-set size (batch 50) and batch size (5,400 images)."""
    setup, args = bench.setup, bench.args
    precisions = args.scaling_precisions
    rows: list[dict[str, Any]] = []
    datasets = {
        subset: (
            setup.data
            if subset == setup.config.data.train_subset
            else build_data(setup.config, subset)
        )
        for subset in args.sizes
    }
    specs: dict[str, Spec] = {}
    meta: dict[str, dict[str, Any]] = {}
    epochs = args.scaling_epochs
    for precision in precisions:
        for subset, data in datasets.items():
            key = f"size {subset or 60000} {precision}"
            specs[key] = bench.spec(
                "deepopt",
                epochs,
                subset=subset,
                train={"precision": precision},
                run_name=f"scaling-{subset}-{precision}",
            )
            meta[key] = {
                "kind": "size",
                "subset": subset,
                "train_images": data.train_count,
                "batch_size": setup.batch_size,
                "precision": precision,
            }
        for batch in args.batches:
            key = f"batch {batch} {precision}"
            if batch == setup.batch_size and setup.config.data.train_subset in datasets:
                continue  # the size row of the benchmark's own subset is this row
            specs[key] = bench.spec(
                "deepopt",
                epochs,
                train={"precision": precision, "batch_size": batch},
                run_name=f"scaling-b{batch}-{precision}",
            )
            meta[key] = {
                "kind": "batch",
                "subset": setup.config.data.train_subset,
                "train_images": setup.data.train_count,
                "batch_size": batch,
                "precision": precision,
            }
    timings = interleave(specs, epochs, "scaling")
    for key, timing in timings.items():
        rows.append(
            {
                "key": key,
                **meta[key],
                **timing.to_dict(),
                "samples_per_s": meta[key]["train_images"] / timing.median,
            }
        )
    return {"rows": rows}


def section_cli(bench: Bench) -> dict[str, Any]:
    """Wall time of ``deepopt --help`` and which heavy modules its import pulls in."""
    exe = shutil.which("deepopt", path=str(Path(sys.executable).parent)) or "deepopt"
    times = []
    for _ in range(bench.args.cli_runs):
        tic = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - tic)
    probe = (
        "import sys, contextlib, io\n"
        "from deepopt import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "print(','.join(m for m in ('torch', 'mlflow', 'optuna', 'dvc') if m in sys.modules))\n"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()
    median = statistics.median(times)
    say(
        f"  deepopt --help: {median:.3f} s median of {len(times)}; heavy imports: {heavy or 'none'}"
    )
    return {
        "help_median_s": median,
        "help_runs_s": times,
        "heavy_imports": heavy.split(",") if heavy else [],
    }


def _shrink_params(resolved: dict[str, Any]) -> dict[str, Any]:
    """params.yaml fully resolved (every key dvc.yaml may name is present) with every
    run cut to about a second: the same stages and experiments, tiny data and networks."""
    small = copy.deepcopy(resolved)
    small["data"]["train_subset"] = 200
    small["model"].update(conv_channels=[2, 4, 4], dense_units=8)
    if small["model"]["name"] == "mlp":
        small["model"].update(depth=2, width=8)
    small["train"].update(epochs=1, threads=1)
    small["mlflow"]["log_model"] = False
    for overrides in small.get("experiments", {}).values():
        if isinstance(overrides.get("train"), dict):
            overrides["train"]["epochs"] = 1
        model = overrides.get("model")
        if isinstance(model, dict) and model.get("name") == "mlp":
            model.update(depth=2, width=8)
    tune = small.get("tune")
    if isinstance(tune, dict):
        # 3 epochs: the cosine warmup of the search space must leave a cosine epoch.
        for key, value in (("n_trials", 1), ("epochs", 3), ("workers", 1), ("startup_trials", 1)):
            if key in tune:
                tune[key] = value
    return small


def _dvc_env(extra: dict[str, str]) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise BenchError(f"{' '.join(command)} failed in {cwd}: {tail}")
    return time.perf_counter() - tic


def dvc_scratch() -> Path:
    """The scratch copy of the pipeline, kept between benchmark runs (outside the repo)."""
    key = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"deepopt-bench-dvc-{key}"


def section_dvc(bench: Bench) -> dict[str, Any]:
    """A no-op ``dvc repro`` of the repository's pipeline, timed in a scratch copy:
    dvc.yaml, .dvcignore, .dvc/config and src/ as they are, params.yaml resolved and shrunk
    to tiny runs (the same stages). The copy is kept between runs (``dvc_scratch()``), so
    its ``dvc repro`` first reruns only what changed since (everything, the first time: a
    few minutes). Never in the repository itself: a stage that is not up to date trains."""
    from deepopt.config import load_params, parse_params

    work = dvc_scratch()
    env = _dvc_env({"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"})
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    if not (work / ".dvc").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        _timed(["git", "init", "-q"], work, env)
        _timed([dvc, "init", "-q"], work, env)
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, work / name)
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.copytree(
        REPO / "src", work / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    resolved = load_params(bench.args.params).model_dump(mode="json")
    small = _shrink_params(resolved)
    parse_params(small, source="shrunk params.yaml")  # a ConfigError names what to adapt here
    text = yaml.safe_dump(small, sort_keys=False)
    params_file = work / "params.yaml"
    if not params_file.is_file() or params_file.read_text(encoding="utf-8") != text:
        params_file.write_text(text, encoding="utf-8")
    first = _timed([dvc, "repro"], work, env)
    say(f"  dvc: {work} brought up to date in {first:.1f} s")
    times = [_timed([dvc, "repro"], work, env) for _ in range(bench.args.dvc_runs)]
    stages = subprocess.run(
        [dvc, "stage", "list", "--name-only"], cwd=work, env=env, capture_output=True, text=True
    ).stdout.split()
    median = statistics.median(times)
    say(f"  no-op dvc repro ({len(stages)} stages): {median:.2f} s median")
    return {
        "scratch": str(work),
        "update_repro_s": first,
        "noop_runs_s": times,
        "noop_median_s": median,
        "stages": len(stages),
    }


# ---------------------------------------------------------------------------------------
# Report


def targets(results: dict[str, Any], stage_precision: str) -> list[dict[str, Any]]:
    """Each target of the performance issue against this run's numbers; ``stage_precision``
    is params.yaml's train.precision, the one the evaluate stage runs in."""
    checks: list[dict[str, Any]] = []

    def add(key: str, value: float | None, limit: float, higher: bool, unit: str) -> None:
        if value is None:
            return
        met = value >= limit if higher else value < limit
        checks.append(
            {"target": TARGETS_TEXT[key], "value": value, "limit": limit, "unit": unit, "met": met}
        )

    rows = results.get("epoch", {}).get("contenders", {})

    def speed(a: str, b: str) -> float | None:
        return rows[b]["median_s"] / rows[a]["median_s"] if a in rows and b in rows else None

    add("a_vs_b", speed("a", "b"), 0.95, True, "x")
    add("a_vs_d", speed("a", "d"), 1.8, True, "x")
    add("e_vs_b", speed("e", "b"), 1.4, True, "x")
    speedrun = results.get("speedrun")
    gap = bf16_accuracy_gap(speedrun) if speedrun else None
    if gap is not None:
        add("e_accuracy", abs(gap), 0.3, False, "points")
    if speedrun:
        add("speedrun", min(r["test_acc"] for r in speedrun["runs"]), SPEEDRUN_ACCURACY, True, "")
    evaluation = results.get("eval")
    if evaluation:
        # The evaluate stage's own path with params.yaml's precision: channels_last,
        # train.eval_batch_size (1000).
        stage = [
            r
            for r in evaluation["rows"]
            if r["precision"] == stage_precision
            and r["layout"] == "channels_last"
            and r["batch_size"] == 1000
            and r["images"] == 10_000
        ]
        if stage:
            add("eval", stage[0]["median_s"], 0.5, False, "s")
    if "cli" in results:
        add("help", results["cli"]["help_median_s"], 0.3, False, "s")
    if "dvc" in results:
        add("dvc", results["dvc"]["noop_median_s"], 3.0, False, "s")
    return checks


def scaling_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Epoch seconds (samples/s) by training-set size and by batch size, per precision."""
    cell = {(r["train_images"], r["batch_size"], r["precision"]): r for r in rows}
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    sizes = sorted({r["train_images"] for r in rows if r["kind"] == "size"})
    batches = sorted({r["batch_size"] for r in rows})
    base_images = next((r["train_images"] for r in rows if r["kind"] == "batch"), None)
    base_batch = next((r["batch_size"] for r in rows if r["kind"] == "size"), None)
    head = " | ".join(f"{p} epoch s (samples/s)" for p in precisions)
    line = " | ".join("---" for _ in precisions)

    def cells(images: int, batch: int) -> str:
        found = [cell.get((images, batch, p)) for p in precisions]
        return " | ".join(
            f"{r['median_s']:.3f} ({r['samples_per_s']:,.0f})" if r else "-" for r in found
        )

    lines = ["", f"| train images (batch {base_batch}) | {head} |", f"| --- | {line} |"]
    lines += [f"| {images:,} | {cells(images, base_batch or 0)} |" for images in sizes]
    if base_images is not None:
        lines += ["", f"| batch ({base_images:,} images) | {head} |", f"| --- | {line} |"]
        lines += [f"| {batch} | {cells(base_images, batch)} |" for batch in batches]
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    peak = results.get("peak", {}).get("fp32_gflops")
    epoch = results.get("epoch")
    if epoch:
        rows = epoch["contenders"]
        base = rows.get("b", {}).get("median_s")
        lines += [
            f"Epoch = {epoch['train_images']:,} training images (batch {epoch['batch_size']}) "
            f"+ {epoch['val_images']:,} validation images; median of "
            f"{len(next(iter(rows.values()))['epochs_s'])} interleaved epochs after a warm-up.",
            "",
            "| contender | epoch s (median) | min-max | samples/s | vs (b) | GFLOP/s | "
            "efficiency (of fp32 peak) | test acc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, row in rows.items():
            ratio = f"{base / row['median_s']:.2f}x" if base else "-"
            efficiency = f"{row['gflops'] / peak:.0%}" if peak else "-"
            acc = f"{row['test_acc']:.4f}" if row.get("test_acc") is not None else "-"
            lines.append(
                f"| ({key}) {row['name']} | {row['median_s']:.3f} | {min(row['epochs_s']):.3f}-"
                f"{max(row['epochs_s']):.3f} | {row['samples_per_s']:,.0f} | {ratio} | "
                f"{row['gflops']:.0f} | {efficiency} | {acc} |"
            )
        if "f" in rows:
            lines.append("")
            lines.append(
                f"torch.compile: first epoch {rows['f']['warmup_s']:.1f} s, of which "
                f"~{rows['f']['compile_s']:.1f} s compiling."
            )
    if results.get("peak"):
        p = results["peak"]
        lines += [
            "",
            f"Matmul peak in this run: fp32 {p['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {p['bf16_gflops']:.0f} GFLOP/s.",
        ]
    if results.get("eval"):
        rows = results["eval"]["rows"]
        layouts = list(dict.fromkeys(r["layout"] for r in rows))
        cell = {(r["precision"], r["layout"], r["batch_size"]): r["median_s"] for r in rows}
        lines += [
            "",
            f"| evaluate {rows[0]['images']:,} test images: precision, batch | "
            + " | ".join(f"{layout} s" for layout in layouts)
            + " |",
            "| --- | " + " | ".join("---" for _ in layouts) + " |",
        ]
        for precision, batch in dict.fromkeys((r["precision"], r["batch_size"]) for r in rows):
            times = " | ".join(f"{cell[(precision, lay, batch)]:.3f}" for lay in layouts)
            lines.append(f"| {precision}, {batch} | {times} |")
    if results.get("speedrun"):
        s = results["speedrun"]
        per_seed = ", ".join(f"{r['wall_s']:.1f} s / {r['test_acc']:.4f}" for r in s["runs"])
        lines += [
            "",
            f"Speedrun ({s['train_images']:,} training images, "
            f"benchmarks/speedrun.yaml): median {s['median_wall_s']:.1f} s wall to "
            f"test acc {s['median_test_acc']:.4f} over seeds "
            f"{', '.join(str(r['seed']) for r in s['runs'])} "
            f"({per_seed}).",
        ]
        if s.get("fp32_references"):
            fp32 = ", ".join(
                f"{r['seed']}: {r['wall_s']:.1f} s / {r['test_acc']:.4f}"
                for r in s["fp32_references"]
            )
            lines.append(
                f"The same in fp32: {fp32}; bf16 minus fp32, mean over the seeds: "
                f"{bf16_accuracy_gap(s):+.2f} points of test accuracy."
            )
    if results.get("scaling"):
        lines += scaling_tables(results["scaling"]["rows"])
    if results.get("cli") or results.get("dvc"):
        lines.append("")
    if results.get("cli"):
        lines.append(f"`deepopt --help`: {results['cli']['help_median_s']:.3f} s (median).")
    if results.get("dvc"):
        lines.append(
            f"No-op `dvc repro` ({results['dvc']['stages']} stages of dvc.yaml): "
            f"{results['dvc']['noop_median_s']:.2f} s (median)."
        )
    for name, error in results.get("errors", {}).items():
        lines += ["", f"Section {name} failed: {error}"]
    checks = results.get("targets", [])
    if checks:
        lines += ["", "| target | value | met |", "| --- | --- | --- |"]
        for c in checks:
            lines.append(
                f"| {c['target']} | {c['value']:.3f} {c['unit']} | {'yes' if c['met'] else 'NO'} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 timed epochs, only the epoch table (unless --only says more)",
    )
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument(
        "--contenders", default="abcdefg", help="letters of the contenders (default abcdefg)"
    )
    parser.add_argument(
        "--epochs", type=int, help="timed epochs per contender (default 5; quick 3)"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="training subset of the epoch/eval sections (default params: 6000)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=None, help="test images of eval (default: all)"
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--speedrun", type=Path, default=SPEEDRUN_FILE)
    parser.add_argument("--speedrun-seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    args = parser.parse_args(argv)
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    if args.quick and not args.only:
        sections = ("peak", "epoch")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    args.contenders = [c for c in args.contenders.replace(",", "") if c]
    if any(c not in CONTENDERS for c in args.contenders):
        parser.error(f"--contenders: letters of {''.join(CONTENDERS)}")
    args.epochs = args.epochs or (3 if args.quick else 5)
    if args.epochs < 3:
        parser.error("--epochs: at least 3 (the table shows medians)")
    args.eval_rounds = 3 if args.quick else 7
    args.eval_batches = [1000] if args.quick else [250, 1000, 2500, 10000]
    args.scaling_epochs = 3
    args.scaling_precisions = ["fp32", FAST_TRAIN["precision"]]
    args.sizes = [args.subset or 6000] if args.quick else [6000, 30000, None]
    args.batches = [50, 512] if args.quick else [50, 128, 256, 512]
    args.cli_runs = 3 if args.quick else 7
    args.dvc_runs = 3
    return args


def base_config(args: argparse.Namespace) -> RunConfig:
    """params.yaml's base run, without early stopping (every contender runs every epoch)."""
    from deepopt.config import load_params

    params = load_params(args.params)
    overrides: dict[str, Any] = {
        "early_stop": {"enabled": False},
        "mlflow": {"experiment": "bench", "log_model": False},
    }
    if args.subset is not None:
        overrides["data"] = {"train_subset": args.subset}
    return apply_overrides(params.base_run(), overrides)


@contextlib.contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="deepopt-bench-"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = datetime.now(UTC)
    config = base_config(args)
    say(
        f"deepopt benchmark: sections {','.join(args.sections)}; {threads} threads; "
        f"torch {torch.__version__}; load {load()}"
    )
    results: dict[str, Any] = {
        "command": " ".join(
            ["benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_commit": _git_commit(),
        },
        "load_start": load(),
    }
    with scratch(keep=False) as workdir:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
        tracking.configure(workdir)
        experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
        data = build_data(config, config.data.train_subset)
        bench = Bench(args, Setup(config, data, workdir, experiment_id))
        sections: dict[str, Callable[[Bench], dict[str, Any]]] = {
            "peak": section_peak,
            "epoch": section_epoch,
            "eval": section_eval,
            "speedrun": section_speedrun,
            "scaling": section_scaling,
            "cli": section_cli,
            "dvc": section_dvc,
        }
        for name in args.sections:
            say(f"== {name} (load {load()})")
            tic = time.perf_counter()
            try:
                results[name] = sections[name](bench)
            except BenchError as err:  # the other sections still run; the table says why
                results.setdefault("errors", {})[name] = str(err)
                say(f"  {name} FAILED: {err}")
                continue
            results[name]["section_s"] = time.perf_counter() - tic
        if "peak" in results and "epoch" in results:
            # A second peak measurement: the better of the two is the machine's peak.
            again = section_peak(bench)
            for key, value in again.items():
                results["peak"][key] = max(results["peak"][key], value)
    results["load_end"] = load()
    results["targets"] = targets(results, config.train.precision)
    table = markdown(results)
    results["markdown"] = table
    say(
        "\n" + table + f"\n\nload average (1/5/15 min) at start {results['load_start']}, "
        f"at end {results['load_end']}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    target = args.out / f"bench-{stamp}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    say(f"results: {target}")
    return 1 if results.get("errors") else 0


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout.strip()
    return None


if __name__ == "__main__":
    sys.exit(main())
