"""The measuring harness: each contender in its own process, released one epoch at a time
(warm-up, then timed rounds round robin), medians; the scratch folder and the results JSON.

Processes, not threads: torch's OpenMP team of a non-main thread ran the lecture CNN's
epoch 1.6x (fp32) to 2.3x (bf16) slower than the main thread on 2 cores, while every
process here trains in its own main thread, as a user's script does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from deepopt import tracking
from deepopt.config import RunConfig
from deepopt.errors import one_line

from .common import REPO, BenchError, load, say
from .contenders import make_runner
from .data import BenchData, Outcome, Setup, build_data, test_accuracy


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
        runner = make_runner(spec.runner, setup, out, spec.train, spec.run_name)
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
        conn.send(("error", f"{type(err).__name__}: {one_line(err, 500)}"))
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


@dataclass
class Bench:
    """One benchmark run: its arguments, the base setup every section starts from."""

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


@contextlib.contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="deepopt-bench-"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def machine(threads: int) -> dict[str, Any]:
    """The machine and code the numbers were measured on (git commit: None without git)."""
    commit, _ = tracking.git_state(REPO)
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": None if commit == "unknown" else commit,
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_results(results: dict[str, Any], out: Path, started: datetime) -> Path:
    """``results`` as <out>/bench-<UTC start>.json, written atomically; the path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    target = out / f"bench-{stamp}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target
