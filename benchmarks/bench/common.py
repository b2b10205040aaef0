"""The benchmark's names, paths and targets, and its console output (no torch: ``--help``
imports only this)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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
