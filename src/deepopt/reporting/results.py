"""What the pipeline wrote, read for the report: ``metrics/<name>/{train,eval}.json`` and
``plots/<name>/history.csv`` (never MLflow), and each experiment's table row from them."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepopt import paths
from deepopt.config import Params, resolve_experiment
from deepopt.errors import DataError, one_line
from deepopt.paths import BASE_EXPERIMENT, BEST_EXPERIMENT

__all__ = [
    "GRAD_PREFIX",
    "DeepRow",
    "ExperimentResult",
    "History",
    "Stat",
    "Summary",
    "dataset_name",
    "deep_rows",
    "experiment_names",
    "layer_order",
    "load_experiment",
    "parse_history",
    "read_meta",
    "summarize",
]

_RUN_KEYS = ("seed", "epochs_run", "stop_reason", "best_val_acc", "train_seconds")
_HISTORY_COLUMNS = ("epoch", "val_loss", "lr")
GRAD_PREFIX = "grad_norm/"  # history.csv's per-layer gradient-norm columns


@dataclass(frozen=True)
class Stat:
    """A value over an experiment's replicas: the mean, and the sample std when several."""

    mean: float
    std: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if len(values) == 1:
            return cls(float(values[0]))
        return cls(statistics.fmean(values), statistics.stdev(values))

    def format(self, digits: int) -> str:
        text = f"{self.mean:.{digits}f}"
        return text if self.std is None else f"{text} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class History:
    """history.csv of an experiment's first run: its columns in header order, as floats."""

    columns: tuple[str, ...]
    values: dict[str, list[float]]


@dataclass(frozen=True)
class ExperimentResult:
    """What the pipeline wrote for one experiment, as read from disk."""

    name: str
    train: dict[str, Any]  # metrics/<name>/train.json
    evaluation: dict[str, Any]  # metrics/<name>/eval.json
    history: History


@dataclass(frozen=True)
class Summary:
    """One table row, before formatting."""

    name: str
    test_acc: Stat
    best_val_acc: Stat
    epochs_run: Stat
    stop_reasons: tuple[str, ...]  # one per trained network (replicas x members)
    train_seconds: Stat
    replicas: int  # matrix.seeds repetitions: the n of the ± columns
    ensemble_size: int  # networks per replica (train.ensemble)
    first_seed: int  # of the run whose history the plots show


@dataclass(frozen=True)
class DeepRow:
    """A row of the plain-vs-residual table (one resnet experiment, its first run)."""

    name: str
    depth: int
    skip: bool
    batchnorm: bool
    epochs: int
    final_loss: float  # training loss of the last epoch (mean over its batches)
    final_acc: float
    test_acc: Stat
    grad_ratio: float  # first layer's mean gradient norm / the logits' (last epoch)


# ------------------------------------------------------------------------ reading


_REPRO = "run `dvc repro`"  # reruns the stage whose output was damaged or lost
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def _missing(path: Path, writer: str) -> DataError:
    return DataError(f"{path} is missing: {_REPRO} (the {writer} stage writes it)")


def _read_json(path: Path, writer: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            raise DataError(f"{path}: the file is empty; {_REPRO} (the {writer} stage writes it)")
        data = json.loads(text)
    except FileNotFoundError:
        raise _missing(path, writer) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({one_line(err)}); {_REPRO}") from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise DataError(f"{path}: expected a JSON object, got {kind}; {_REPRO}")
    return data


def _cell(text: str | None) -> float:
    # An empty cell is a column an epoch did not record (csv.DictWriter's restval "").
    return math.nan if text is None or text == "" else float(text)


def parse_history(text: str, source: str) -> History:
    """The columns of a history.csv as floats (pure); DataError naming ``source`` if bad."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{source}: the file is empty; {_REPRO}")
    absent = [column for column in _HISTORY_COLUMNS if column not in header]
    if absent:
        shown = one_line(", ".join(header), 80)
        raise DataError(
            f"{source}: missing column(s) {', '.join(absent)}; the header has {shown}; {_REPRO}"
        )
    values: dict[str, list[float]] = {column: [] for column in header}
    for line, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{source}: line {line} has {len(row)} cells, the header {len(header)}; {_REPRO}"
            )
        try:
            for column, cell in zip(header, row, strict=True):
                values[column].append(_cell(cell))
        except ValueError:
            raise DataError(
                f"{source}: line {line} holds a value that is not a number; {_REPRO}"
            ) from None
    if not values["epoch"]:
        raise DataError(f"{source}: no epochs recorded; {_REPRO}")
    return History(columns=tuple(header), values=values)


def _read_history(path: Path) -> History:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(path, "train") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({one_line(err)}); {_REPRO}") from None
    return parse_history(text, str(path))


def load_experiment(name: str) -> ExperimentResult:
    """Read an experiment's train.json, eval.json and history.csv (relative to the cwd);
    history.csv must hold as many epochs as train.json says its first run ran (a file cut
    at a line end is still a well-formed CSV)."""
    train = _read_json(paths.train_metrics_path(name), "train")
    evaluation = _read_json(paths.eval_metrics_path(name), "evaluate")
    history = _read_history(paths.history_path(name))
    epochs = train.get("epochs_run")
    if isinstance(epochs, int | float) and epochs != len(history.values["epoch"]):
        raise DataError(
            f"{paths.history_path(name)}: holds {len(history.values['epoch'])} epochs but "
            f"{paths.train_metrics_path(name)} says the run ran {epochs}; {_REPRO}"
        )
    return ExperimentResult(name=name, train=train, evaluation=evaluation, history=history)


def experiment_names(params: Params, root: Path = Path(".")) -> list[str]:
    """params.yaml's experiments in their order (the base run when there are none), then
    train_best when the tune stage has trained it."""
    names = list(params.experiments) or [BASE_EXPERIMENT]
    if BEST_EXPERIMENT not in names and (root / paths.train_metrics_path(BEST_EXPERIMENT)).exists():
        names.append(BEST_EXPERIMENT)
    return names


def read_meta() -> dict[str, Any]:
    """data/prepared/meta.json, as the prepare stage wrote it."""
    return _read_json(paths.meta_path(), "prepare")


def dataset_name(meta: Mapping[str, Any]) -> str:
    """The data set's name in meta.json (DataError when it has none)."""
    for key in ("dataset", "name"):
        if isinstance(meta.get(key), str):
            return str(meta[key])
    raise DataError(f"{paths.meta_path()}: has no 'dataset' name; {_REPRO}")


# ------------------------------------------------------------------------ summary


def _number(data: Mapping[str, Any], key: str, source: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        shown = one_line(repr(value), 60)
        raise DataError(f"{source}: '{key}' is {shown}, expected a finite number; {_REPRO}")
    return float(value)


def _runs(train: Mapping[str, Any], source: str) -> list[Mapping[str, Any]]:
    runs = train.get("runs", [train])
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise DataError(f"{source}: 'runs' must be a non-empty list of objects; {_REPRO}")
    for run in runs:
        absent = [key for key in _RUN_KEYS if key not in run]
        if absent:
            raise DataError(f"{source}: a run lacks {', '.join(absent)}; {_REPRO}")
    return runs


def _test_acc(evaluation: Mapping[str, Any], source: str) -> Stat:
    """eval.json's test accuracy, with its test_acc_std over replicas when it has one."""
    mean = _number(evaluation, "test_acc", source)
    if evaluation.get("test_acc_std") is None:
        return Stat(mean)
    std = _number(evaluation, "test_acc_std", source)
    runs = evaluation.get("runs")
    several = isinstance(runs, list) and len(runs) > 1
    # A single replica's std is written as 0.0 (metrics.mean_and_std): no spread to show.
    return Stat(mean) if std == 0.0 and not several else Stat(mean, std)


def _ensemble_size(evaluation: Mapping[str, Any], runs: int, source: str) -> int:
    size = evaluation.get("ensemble_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or runs % size:
        raise DataError(
            f"{source}: ensemble_size {size!r} does not divide the {runs} trained runs; {_REPRO}"
        )
    return size


def summarize(result: ExperimentResult) -> Summary:
    """The table row of one experiment (pure).

    train.json lists every trained network, replica by replica (members of an ensemble
    next to each other). Each replica counts once: its members' mean best val acc and
    epochs, and their summed training time (what the replica cost); ± is over replicas.
    """
    train_source = str(paths.train_metrics_path(result.name))
    eval_source = str(paths.eval_metrics_path(result.name))
    runs = _runs(result.train, train_source)
    size = _ensemble_size(result.evaluation, len(runs), eval_source)
    replicas = [runs[start : start + size] for start in range(0, len(runs), size)]

    def per_replica(key: str, combine: Callable[[list[float]], float]) -> Stat:
        return Stat.of([combine([_number(r, key, train_source) for r in rep]) for rep in replicas])

    return Summary(
        name=result.name,
        test_acc=_test_acc(result.evaluation, eval_source),
        best_val_acc=per_replica("best_val_acc", statistics.fmean),
        epochs_run=per_replica("epochs_run", statistics.fmean),
        stop_reasons=tuple(str(r["stop_reason"]) for r in runs),
        train_seconds=per_replica("train_seconds", math.fsum),
        replicas=len(replicas),
        ensemble_size=size,
        first_seed=int(_number(runs[0], "seed", train_source)),
    )


def layer_order(history: History) -> list[str]:
    """The layers with a grad_norm column, in header order: train writes them in the
    order the forward pass reaches them, input to output."""
    return [c.removeprefix(GRAD_PREFIX) for c in history.columns if c.startswith(GRAD_PREFIX)]


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
        values = result.history.values
        layers = layer_order(result.history)
        first, last = (values[GRAD_PREFIX + layers[i]][-1] for i in (0, -1)) if layers else (0, 0)
        rows.append(
            DeepRow(
                name=result.name,
                depth=model.depth,
                skip=model.skip,
                batchnorm=model.batchnorm,
                epochs=len(values["epoch"]),
                final_loss=values["loss"][-1] if "loss" in values else math.nan,
                final_acc=values["acc"][-1] if "acc" in values else math.nan,
                test_acc=summary.test_acc,
                grad_ratio=first / last if layers and last > 0 else math.nan,
            )
        )
    return rows
