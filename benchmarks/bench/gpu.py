"""``bench_train.py --device cuda``: the training core on a GPU, without the services.

Only torch, pydantic, pyyaml and deepopt's core (no mlflow, dvc, optuna: a GPU machine may
lack them). Three figures, each against the issue's target:

  loop      deepopt's ``fit`` against a bare PyTorch loop with the data on the device (the
            same network, optimizer, batches and per-epoch validation): ratio >= 0.95x
  epoch     the lecture BN-CNN's epoch (5,400 training images, batch 50, fp32): <= 0.2 s
  speedrun  ``benchmarks/speedrun.yaml`` on the full Fashion-MNIST to >= 91 % test
            accuracy, wall seconds after a warm-up run: <= 5 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from deepopt import devices
from deepopt.config import EarlyStopConfig, RunConfig, apply_overrides
from deepopt.data import PreparedData, normalize, prepare
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training.loop import evaluate_logits, fit, steps_per_epoch

from .common import REPO, say

TARGETS = {"loop_ratio": 0.95, "epoch_s": 0.2, "speedrun_s": 5.0, "speedrun_acc": 0.91}


def _tensors(data: PreparedData, device: torch.device) -> dict[str, torch.Tensor]:
    """The splits normalized on ``device`` (the uint8 tensors move once)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        out[f"{name}_x"] = normalize(split.images.to(device), data.mean, data.std)
        out[f"{name}_y"] = split.labels.to(device)
    return out


def _model(config: RunConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(model.parameters(), config.optim)
    return model, optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _deepopt_epochs(
    config: RunConfig, t: dict[str, torch.Tensor], device: torch.device, epochs: int
) -> list[float]:
    model, optimizer = _model(config, device)
    schedule = build_schedule(
        optimizer,
        config.schedule,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch(len(t["train_y"]), config.train.batch_size),
    )
    result = fit(
        model,
        optimizer,
        schedule,
        (t["train_x"], t["train_y"]),
        (t["val_x"], t["val_y"]),
        epochs=epochs,
        batch_size=config.train.batch_size,
        early_stop=EarlyStopConfig(enabled=False),
        seed=config.seed,
        precision=config.train.precision,
        device=device,
    )
    return [r["seconds"] for r in result.history]  # each ends in the epoch's metric sync


def _bare_epochs(
    config: RunConfig, t: dict[str, torch.Tensor], device: torch.device, epochs: int
) -> list[float]:
    """A bare PyTorch loop: index slices on the device, one sync per epoch."""
    model, optimizer = _model(config, device)
    loss_fn = nn.CrossEntropyLoss()
    images, labels, batch = t["train_x"], t["train_y"], config.train.batch_size
    shuffle = torch.Generator().manual_seed(config.seed)
    times = []
    for _ in range(epochs):
        _sync(device)
        tic = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), generator=shuffle).to(device)
        total = torch.zeros((), device=device)
        for begin in range(0, len(images), batch):
            index = order[begin : begin + batch]
            loss = loss_fn(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        model.eval()
        with torch.inference_mode():
            val = loss_fn(model(t["val_x"]), t["val_y"])
        _ = (float(total), float(val))  # the epoch's one sync, as fit's
        times.append(time.perf_counter() - tic)
    return times


def section_loop(config: RunConfig, device: torch.device, epochs: int) -> dict[str, Any]:
    """deepopt vs the bare loop on the lecture split (5,400 / 600), batch 50, fp32; one
    warm-up epoch each (dropped), then ``epochs`` timed, rounds alternating."""
    config = apply_overrides(
        config, {"data": {"train_subset": 6000}, "train": {"batch_size": 50, "precision": "fp32"}}
    )
    data = prepare(config.data, config.seed, root=REPO, download=False).data
    t = _tensors(data, device)
    deepopt_s: list[float] = []
    bare_s: list[float] = []
    for _ in range(2):  # two rounds of each, alternating, against drift
        deepopt_s += _deepopt_epochs(config, t, device, epochs + 1)[1:]
        bare_s += _bare_epochs(config, t, device, epochs + 1)[1:]
    epoch = statistics.median(deepopt_s)
    bare = statistics.median(bare_s)
    out = {
        "train_images": len(t["train_y"]),
        "batch_size": 50,
        "deepopt_epoch_s": epoch,
        "bare_epoch_s": bare,
        "ratio": bare / epoch,
    }
    say(
        f"  epoch: deepopt {epoch:.3f} s, bare {bare:.3f} s, ratio {bare / epoch:.3f}x "
        f"(targets: <= {TARGETS['epoch_s']} s, >= {TARGETS['loop_ratio']}x)"
    )
    return out


def section_speedrun(config: RunConfig, device: torch.device, speedrun: Path) -> dict[str, Any]:
    """benchmarks/speedrun.yaml once as a warm-up, then timed: wall seconds from the moved
    tensors to the trained network (the data preparation is not timed), test accuracy."""
    with open(speedrun, encoding="utf-8") as handle:
        overrides = yaml.safe_load(handle)
    config = apply_overrides(config, overrides or {}, prefix=speedrun.name)
    data = prepare(config.data, config.seed, root=REPO, download=False).data
    runs = []
    for attempt in ("warm-up", "timed"):
        _sync(device)
        tic = time.perf_counter()
        t = _tensors(data, device)
        model, optimizer = _model(config, device)
        schedule = build_schedule(
            optimizer,
            config.schedule,
            epochs=config.train.epochs,
            steps_per_epoch=steps_per_epoch(len(t["train_y"]), config.train.batch_size),
        )
        fit(
            model,
            optimizer,
            schedule,
            (t["train_x"], t["train_y"]),
            (t["val_x"], t["val_y"]),
            epochs=config.train.epochs,
            batch_size=config.train.batch_size,
            early_stop=EarlyStopConfig(enabled=False),
            seed=config.seed,
            precision=config.train.precision,
            device=device,
        )
        _sync(device)
        wall = time.perf_counter() - tic
        logits = evaluate_logits(model, t["test_x"], 1000, config.train.precision, device)
        acc = float((logits.argmax(dim=1) == t["test_y"]).float().mean())
        say(f"  speedrun {attempt}: {wall:.2f} s, test accuracy {acc:.4f}")
        runs.append({"wall_s": wall, "test_acc": acc})
    return {
        "epochs": config.train.epochs,
        "batch_size": config.train.batch_size,
        "precision": config.train.precision,
        "warm_up": runs[0],
        **runs[1],
    }


def run(args: argparse.Namespace, config: RunConfig) -> int:
    """The GPU sections; the results JSON goes to ``args.out``; 1 when a target is missed."""
    device = devices.resolve_device(args.device)
    devices.check_precision(device, "bf16")
    devices.configure_backends(device, deterministic=False, tf32=False)
    tags = devices.device_tags(device)
    say(f"deepopt GPU benchmark on {tags}; torch {torch.__version__}")
    results: dict[str, Any] = {
        "device": tags,
        "torch": torch.__version__,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    results["loop"] = section_loop(config, device, args.epochs)
    results["speedrun"] = section_speedrun(config, device, args.speedrun)
    met = {
        "loop_ratio": results["loop"]["ratio"] >= TARGETS["loop_ratio"],
        "epoch_s": results["loop"]["deepopt_epoch_s"] <= TARGETS["epoch_s"],
        "speedrun_s": results["speedrun"]["wall_s"] <= TARGETS["speedrun_s"],
        "speedrun_acc": results["speedrun"]["test_acc"] >= TARGETS["speedrun_acc"],
    }
    results["targets"] = {"wanted": TARGETS, "met": met}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = args.out / f"gpu-{stamp}.json"
    target.write_text(json.dumps(results, indent=2), encoding="utf-8")
    say(f"targets met: {met}\nresults: {target}")
    return 0 if all(met.values()) else 1
