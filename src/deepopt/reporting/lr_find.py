"""The report's learning-rate section: the LR range test's suggestion (lr_find/base.json,
written by ``deepopt lr-find``) beside the rate the matrix trains at (the base config's
optim.lr, and the tested experiment's) and the tuned one (params/best.yaml's optim.lr,
written by tune). ``read_learning_rates`` reads both files; the rest is pure, and
``learning_rate_rows`` / ``learning_rate_note`` give the same plain values to every page."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepopt import paths
from deepopt.config import load_overrides
from deepopt.errors import DataError
from deepopt.reporting.reading import REPRO, _read_json

__all__ = [
    "LearningRates",
    "learning_rate_note",
    "learning_rate_rows",
    "lr_find_lines",
    "read_learning_rates",
]

_WRITER = "lr_find"  # the dvc stage that writes lr_find/base.json


@dataclass(frozen=True)
class LearningRates:
    experiment: str  # the experiment the range test ran on (base: the base config)
    optimizer: str
    batch_size: int
    suggestion: float | None  # None: the test ran too few batches to suggest from
    lr_used: float  # the experiment's optim.lr
    base_lr: float  # the base config's optim.lr, which the matrix's experiments start from
    batches: int
    stop_reason: str  # num_iter | diverged | non_finite
    start_lr: float
    end_lr: float
    num_iter: int
    tuned_lr: float | None  # params/best.yaml's optim.lr (the base one when not searched)
    tuned_optimizer: str | None  # params/best.yaml's optim.name, None when it keeps the base's
    plot: str  # the plot's path relative to the repository root


def _number(data: Mapping[str, Any], key: str, source: Path, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{source}: '{key}' is {value!r}, not a finite number; {REPRO}")
    return value


def _text(data: Mapping[str, Any], key: str, source: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{source}: '{key}' is {value!r}, not a name; {REPRO}")
    return value


def read_learning_rates(root: Path = Path(".")) -> LearningRates | None:
    """The base config's range test and the tuned rate, or None when the test has not run
    (no lr_find/base.json). A damaged file is a one-line DataError (ConfigError for
    params/best.yaml, as train_best reads it)."""
    source = root / paths.lr_find_metrics_path(paths.BASE_EXPERIMENT)
    if not source.exists():
        return None
    data = _read_json(source, _WRITER)
    tuned_lr, tuned_optimizer = None, None
    best = root / paths.BEST_PARAMS
    if best.exists():
        optim = load_overrides(best).get("optim")
        optim = optim if isinstance(optim, dict) else {}  # no optim section: the base's
        tuned_lr = optim.get("lr", data.get("base_lr"))
        tuned_optimizer = optim.get("name")
    return LearningRates(
        experiment=_text(data, "experiment", source),
        optimizer=_text(data, "optimizer", source),
        batch_size=int(_number(data, "batch_size", source)),
        suggestion=_number(data, "suggestion", source, optional=True),
        lr_used=_number(data, "lr_used", source),
        base_lr=_number(data, "base_lr", source),
        batches=int(_number(data, "batches", source)),
        stop_reason=_text(data, "stop_reason", source),
        start_lr=_number(data, "start_lr", source),
        end_lr=_number(data, "end_lr", source),
        num_iter=int(_number(data, "num_iter", source)),
        tuned_lr=None if tuned_lr is None else float(tuned_lr),
        tuned_optimizer=None if tuned_optimizer is None else str(tuned_optimizer),
        plot=str(paths.lr_find_plot_path(paths.BASE_EXPERIMENT)),
    )


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def learning_rate_rows(rates: LearningRates) -> list[tuple[str, str]]:
    """(what, learning rate) rows: the suggestion, the rates trained at, the tuned one."""
    rows = [("suggested by the range test (fastai's valley)", _rate(rates.suggestion))]
    if rates.experiment != paths.BASE_EXPERIMENT:
        rows.append((f"optim.lr of experiment {rates.experiment}", _rate(rates.lr_used)))
    rows.append(
        ("optim.lr of the base config (the matrix's unless overridden)", _rate(rates.base_lr))
    )
    if rates.tuned_lr is None:
        rows.append(("tuned (params/best.yaml)", "not tuned yet"))
    else:
        optimizer = f", {rates.tuned_optimizer}" if rates.tuned_optimizer else ""
        rows.append((f"tuned (params/best.yaml{optimizer})", _rate(rates.tuned_lr)))
    return rows


_STOPPED = {
    "num_iter": "all {num_iter} batches ran",
    "diverged": "stopped after {batches} batches: the smoothed loss passed 4x its best",
    "non_finite": "stopped after {batches} batches: the loss became NaN/inf",
}


def learning_rate_note(rates: LearningRates) -> str:
    """One paragraph on what the test ran and how to read its suggestion."""
    stopped = _STOPPED.get(rates.stop_reason, "stopped: {stop_reason}").format(
        num_iter=rates.num_iter, batches=rates.batches, stop_reason=rates.stop_reason
    )
    note = (
        f"The LR range test (Smith 2017, as fastai's lr_find) trained `{rates.experiment}` "
        f"({rates.optimizer}, batch {rates.batch_size}) from its initial weights at rates "
        f"growing from {rates.start_lr:.3g} to {rates.end_lr:.3g} over {rates.num_iter} "
        f"batches ({stopped}). Its suggestion lies about halfway along the longest descent "
        "of the smoothed loss: a starting rate for this optimizer, not a tuned one."
    )
    if rates.suggestion is None:
        note += " Too few batches ran to suggest a rate (it skips the first tenth and last 5)."
    return note


def lr_find_lines(rates: LearningRates | None) -> list[str]:
    """The section of reports/lecture.md (pure); "not run" without a range test."""
    lines = ["## Learning rate: range test", ""]
    if rates is None:
        written = paths.lr_find_metrics_path(paths.BASE_EXPERIMENT)
        return [*lines, f"Not run: `deepopt lr-find` (dvc stage {_WRITER}) writes {written}.", ""]
    lines += [learning_rate_note(rates), "", "| learning rate | value |", "|---|---:|"]
    lines += [f"| {what} | {value} |" for what, value in learning_rate_rows(rates)]
    return [*lines, "", f"![loss against learning rate](../{rates.plot})", ""]
