"""Each experiment's values replica by replica, from what ``reporting.reading`` read of
``metrics/<name>/{train,eval}.json``, ``history.csv`` and ``runs.csv``, and its table row
from them (mean and 95 % t interval over replicas).

train.json lists every trained network under "runs", replica-major (replica 0's members,
then replica 1's, ...); replica r of every experiment trained with seed + r, so values
keyed by replica index pair across experiments. Older single-run files (no "runs", no
"replica") still read: the file itself is replica 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deepopt import paths
from deepopt.config import Params, resolve_experiment
from deepopt.errors import DataError, one_line
from deepopt.reporting.reading import (
    GRAD_PREFIX,
    REPRO,
    ZERO_PREFIX,
    ExperimentResult,
    History,
    RunHistory,
    checked_ensemble_size,
    dataset_name,
    experiment_names,
    load_experiment,
    parse_history,
    parse_runs,
    read_meta,
    train_runs,
)
from deepopt.stats import Interval, mean_interval

__all__ = [
    "GRAD_PREFIX",
    "ZERO_PREFIX",
    "DeepRow",
    "ExperimentResult",
    "History",
    "RunHistory",
    "Summary",
    "dataset_name",
    "deep_rows",
    "experiment_names",
    "layer_order",
    "load_experiment",
    "parse_history",
    "parse_runs",
    "read_meta",
    "replica_curves",
    "replica_means",
    "replica_test_acc",
    "summarize",
    "train_runs",
]


@dataclass(frozen=True)
class Summary:
    """One table row, before formatting: each value's mean and t interval over replicas."""

    name: str
    test_acc: Interval  # of each replica's test accuracy (an ensemble's: the ensemble's)
    best_val_acc: Interval  # of each replica's members' mean
    epochs_run: Interval  # ditto
    stop_reasons: tuple[str, ...]  # one per trained network (replicas x members)
    train_seconds: Interval  # of each replica's members' sum (what the replica cost)
    replicas: int  # matrix.seeds repetitions: the n of the intervals
    ensemble_size: int  # networks per replica (train.ensemble)
    first_seed: int  # of the first run


@dataclass(frozen=True)
class DeepRow:
    """A row of the plain-vs-residual table (one resnet experiment, over its replicas)."""

    name: str
    depth: int
    skip: bool
    batchnorm: bool
    epochs: int
    final_loss: Interval  # training loss of the last epoch (mean over its batches)
    final_acc: Interval
    test_acc: Interval
    grad_ratio: Interval  # first layer's mean gradient norm / the logits' (last epoch)


# ------------------------------------------------------------------------ per replica


def _number(data: Mapping[str, Any], key: str, source: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        shown = one_line(repr(value), 60)
        raise DataError(f"{source}: '{key}' is {shown}, expected a finite number; {REPRO}")
    return float(value)


def replica_means(
    runs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float]
) -> dict[int, float]:
    """Each replica's mean of ``value`` over its members, by replica index (pure); members
    whose value is not finite (a missing field: nan) are left out, and so is a replica
    without any."""
    members: dict[int, list[float]] = {}
    for run in runs:
        number = value(run)
        if math.isfinite(number):
            members.setdefault(int(run["replica"]), []).append(number)
    return {replica: statistics.fmean(values) for replica, values in members.items()}


def replica_test_acc(result: ExperimentResult) -> dict[int, float]:
    """Each replica's test accuracy from eval.json's runs (an ensemble's: the ensemble's),
    by replica index; an eval.json without runs is replica 0's (pure)."""
    source = str(paths.eval_metrics_path(result.name))
    runs = result.evaluation.get("runs")
    if not isinstance(runs, list) or not runs:
        return {0: _number(result.evaluation, "test_acc", source)}
    values = {}
    for position, run in enumerate(runs):
        if not isinstance(run, dict):
            raise DataError(f"{source}: 'runs' must be a list of objects; {REPRO}")
        replica = run.get("replica", position)
        values[int(replica)] = _number(run, "test_acc", source)
    return values


def replica_curves(result: ExperimentResult) -> list[History]:
    """Each replica's history of its first member (member 0), in replica order (pure)."""
    first: dict[int, History] = {}
    for run in sorted(result.runs, key=lambda r: (r.replica, r.member)):
        first.setdefault(run.replica, run.history)
    return [first[replica] for replica in sorted(first)]


# ------------------------------------------------------------------------ summary


def _interval(values: Mapping[int, float]) -> Interval:
    return mean_interval([values[replica] for replica in sorted(values)])


def summarize(result: ExperimentResult) -> Summary:
    """The table row of one experiment (pure).

    Each replica counts once: its members' mean best val acc and epochs, and their summed
    training time (what the replica cost); the intervals are over replicas.
    """
    source = str(paths.train_metrics_path(result.name))
    runs = train_runs(result)
    # The top-level figures (what `dvc metrics show` shows) must be numbers too, though the
    # row is made from the per-replica ones: a damaged file is refused, not half-read.
    _number(result.train, "best_val_acc", source)
    _number(result.evaluation, "test_acc", str(paths.eval_metrics_path(result.name)))

    def key(name: str) -> Callable[[Mapping[str, Any]], float]:
        return lambda run: _number(run, name, source)

    seconds: dict[int, float] = {}
    for run in runs:
        replica = int(run["replica"])
        seconds[replica] = seconds.get(replica, 0.0) + _number(run, "train_seconds", source)
    return Summary(
        name=result.name,
        test_acc=_interval(replica_test_acc(result)),
        best_val_acc=_interval(replica_means(runs, key("best_val_acc"))),
        epochs_run=_interval(replica_means(runs, key("epochs_run"))),
        stop_reasons=tuple(str(r["stop_reason"]) for r in runs),
        train_seconds=_interval(seconds),
        replicas=len({int(r["replica"]) for r in runs}),
        ensemble_size=checked_ensemble_size(
            result.evaluation, len(runs), str(paths.eval_metrics_path(result.name))
        ),
        first_seed=int(_number(runs[0], "seed", source)),
    )


def layer_order(history: History) -> list[str]:
    """The layers with a grad_norm column, in header order: train writes them in the
    order the forward pass reaches them, input to output."""
    return [c.removeprefix(GRAD_PREFIX) for c in history.columns if c.startswith(GRAD_PREFIX)]


def _field(name: str) -> Callable[[Mapping[str, Any]], float]:
    def value(run: Mapping[str, Any]) -> float:
        number = run.get(name)
        return float(number) if isinstance(number, int | float) else math.nan

    return value


def _grad_ratio(run: Mapping[str, Any]) -> float:
    norms = run.get("final_grad_norm")
    if not isinstance(norms, dict) or not norms:
        return math.nan
    layers = list(norms.values())
    return float(layers[0] / layers[-1]) if layers[-1] > 0 else math.nan


def deep_rows(
    params: Params, results: Sequence[ExperimentResult], summaries: Sequence[Summary]
) -> list[DeepRow]:
    """The resnet experiments' rows (pure): their config from params, the rest from disk."""
    rows = []
    for result, summary in zip(results, summaries, strict=True):
        if result.name not in params.experiments:
            continue
        model = resolve_experiment(params, result.name).model
        if model.name != "resnet":
            continue
        runs = train_runs(result)
        rows.append(
            DeepRow(
                name=result.name,
                depth=model.depth,
                skip=model.skip,
                batchnorm=model.batchnorm,
                epochs=len(result.history.values["epoch"]),
                final_loss=_interval(replica_means(runs, _field("final_loss"))),
                final_acc=_interval(replica_means(runs, _field("final_acc"))),
                test_acc=summary.test_acc,
                grad_ratio=_interval(replica_means(runs, _grad_ratio)),
            )
        )
    return rows
