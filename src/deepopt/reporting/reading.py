"""What the pipeline wrote, read back for the report: ``metrics/<name>/{train,eval}.json``,
``plots/<name>/history.csv`` and ``runs.csv`` (never MLflow), each checked as it is read (a
damaged or missing file is a one-line DataError naming it and the stage that writes it)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepopt import paths
from deepopt.config import Params
from deepopt.errors import DataError, one_line
from deepopt.files import read_json
from deepopt.paths import BASE_EXPERIMENT, BEST_EXPERIMENT

__all__ = [
    "GRAD_PREFIX",
    "REPRO",
    "ZERO_PREFIX",
    "ExperimentResult",
    "History",
    "RunHistory",
    "checked_ensemble_size",
    "dataset_name",
    "experiment_names",
    "load_experiment",
    "parse_history",
    "parse_runs",
    "read_meta",
    "train_runs",
]

_RUN_KEYS = ("seed", "epochs_run", "stop_reason", "best_val_acc", "train_seconds")
_HISTORY_COLUMNS = ("epoch", "val_loss", "lr")
_RUN_COLUMNS = ("replica", "member", "seed")  # runs.csv's, before the history columns
GRAD_PREFIX = "grad_norm/"  # history.csv's per-layer gradient-norm columns
ZERO_PREFIX = "zero_fraction/"  # ... and per-ReLU-layer fraction of zero outputs


@dataclass(frozen=True)
class History:
    """One network's per-epoch history: its columns in header order, as floats."""

    columns: tuple[str, ...]
    values: dict[str, list[float]]


@dataclass(frozen=True)
class RunHistory:
    """One trained network's history, from runs.csv."""

    replica: int
    member: int
    seed: int
    history: History


@dataclass(frozen=True)
class ExperimentResult:
    """What the pipeline wrote for one experiment, as read from disk."""

    name: str
    train: dict[str, Any]  # metrics/<name>/train.json
    evaluation: dict[str, Any]  # metrics/<name>/eval.json
    history: History  # plots/<name>/history.csv: the first run's
    runs: tuple[RunHistory, ...]  # plots/<name>/runs.csv; without it, history.csv alone


# ------------------------------------------------------------------------ reading


REPRO = "run `dvc repro`"  # reruns the stage whose output was damaged or lost


def _missing(path: Path, writer: str) -> DataError:
    return DataError(f"{path} is missing: {REPRO} (the {writer} stage writes it)")


def _read_json(path: Path, writer: str) -> dict[str, Any]:
    return read_json(path, REPRO, f" (the {writer} stage writes it)")


def _cell(text: str | None) -> float:
    # An empty cell is a column an epoch did not record (csv.DictWriter's restval "").
    return math.nan if text is None or text == "" else float(text)


def _parse_table(
    text: str, source: str, required: Sequence[str]
) -> tuple[list[str], list[list[float]]]:
    """A CSV's header and its rows as floats; DataError naming ``source`` if bad."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{source}: the file is empty; {REPRO}")
    absent = [column for column in required if column not in header]
    if absent:
        shown = one_line(", ".join(header), 80)
        raise DataError(
            f"{source}: missing column(s) {', '.join(absent)}; the header has {shown}; {REPRO}"
        )
    rows = []
    for line, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{source}: line {line} has {len(row)} cells, the header {len(header)}; {REPRO}"
            )
        try:
            rows.append([_cell(cell) for cell in row])
        except ValueError:
            raise DataError(
                f"{source}: line {line} holds a value that is not a number; {REPRO}"
            ) from None
    if not rows:
        raise DataError(f"{source}: no epochs recorded; {REPRO}")
    return header, rows


def _history(header: Sequence[str], rows: Sequence[Sequence[float]]) -> History:
    values = {column: [row[i] for row in rows] for i, column in enumerate(header)}
    return History(columns=tuple(header), values=values)


def parse_history(text: str, source: str) -> History:
    """The columns of a history.csv as floats (pure); DataError naming ``source`` if bad."""
    header, rows = _parse_table(text, source, _HISTORY_COLUMNS)
    return _history(header, rows)


def parse_runs(text: str, source: str) -> tuple[RunHistory, ...]:
    """runs.csv (replica, member, seed, then history.csv's columns) as one history per
    network, in the file's order (pure)."""
    header, rows = _parse_table(text, source, (*_RUN_COLUMNS, *_HISTORY_COLUMNS))
    index = {column: header.index(column) for column in _RUN_COLUMNS}
    columns = [c for c in header if c not in _RUN_COLUMNS]
    keep = [header.index(c) for c in columns]
    grouped: dict[tuple[int, int, int], list[list[float]]] = {}
    for line, row in enumerate(rows, start=2):
        replica, member, seed = (row[index[c]] for c in _RUN_COLUMNS)
        if not all(math.isfinite(v) and v.is_integer() for v in (replica, member, seed)):
            raise DataError(f"{source}: line {line} has no whole replica/member/seed; {REPRO}")
        key = (int(replica), int(member), int(seed))
        grouped.setdefault(key, []).append([row[i] for i in keep])
    return tuple(
        RunHistory(replica, member, seed, _history(columns, network_rows))
        for (replica, member, seed), network_rows in grouped.items()
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(path, "train") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({one_line(err)}); {REPRO}") from None


def load_experiment(name: str) -> ExperimentResult:
    """Read an experiment's train.json, eval.json, history.csv and runs.csv (relative to
    the cwd); each history must hold as many epochs as train.json says its run ran."""
    train = _read_json(paths.train_metrics_path(name), "train")
    evaluation = _read_json(paths.eval_metrics_path(name), "evaluate")
    history = parse_history(_read_text(paths.history_path(name)), str(paths.history_path(name)))
    epochs = train.get("epochs_run")
    if isinstance(epochs, int | float) and epochs != len(history.values["epoch"]):
        raise DataError(
            f"{paths.history_path(name)}: holds {len(history.values['epoch'])} epochs but "
            f"{paths.train_metrics_path(name)} says the run ran {epochs}; {REPRO}"
        )
    runs_path = paths.runs_history_path(name)
    if runs_path.exists():
        runs = parse_runs(_read_text(runs_path), str(runs_path))
    else:  # written before runs.csv existed: the first run's history stands for replica 0
        seed = train.get("seed")
        runs = (RunHistory(0, 0, int(seed) if isinstance(seed, int) else 0, history),)
    result = ExperimentResult(name, train, evaluation, history, runs)
    ran = {(int(r["replica"]), int(r["member"])): r["epochs_run"] for r in train_runs(result)}
    for run in runs:
        expected = ran.get((run.replica, run.member))
        recorded = len(run.history.values["epoch"])
        if isinstance(expected, int | float) and expected != recorded:
            raise DataError(
                f"{runs_path}: replica {run.replica} member {run.member} holds {recorded} "
                f"epochs but {paths.train_metrics_path(name)} says it ran {expected}; {REPRO}"
            )
    return result


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
    raise DataError(f"{paths.meta_path()}: has no 'dataset' name; {REPRO}")


def checked_ensemble_size(evaluation: Mapping[str, Any], runs: int, source: str) -> int:
    size = evaluation.get("ensemble_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or runs % size:
        raise DataError(
            f"{source}: ensemble_size {size!r} does not divide the {runs} trained runs; {REPRO}"
        )
    return size


def _last_layers(history: History, prefix: str) -> dict[str, float]:
    return {
        c.removeprefix(prefix): history.values[c][-1]
        for c in history.columns
        if c.startswith(prefix)
    }


def train_runs(result: ExperimentResult) -> list[dict[str, Any]]:
    """train.json's runs, checked, each with its replica and member index (pure).

    An older file without them is read as replica-major runs of ensemble_size members; a
    first run without final_loss/final_acc or the per-layer diagnostics gets them from
    history.csv's last epoch (the first run's)."""
    source = str(paths.train_metrics_path(result.name))
    raw = result.train.get("runs", [result.train])
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise DataError(f"{source}: 'runs' must be a non-empty list of objects; {REPRO}")
    size = checked_ensemble_size(
        result.evaluation, len(raw), str(paths.eval_metrics_path(result.name))
    )
    runs = []
    for position, run in enumerate(raw):
        absent = [key for key in _RUN_KEYS if key not in run]
        if absent:
            raise DataError(f"{source}: a run lacks {', '.join(absent)}; {REPRO}")
        runs.append({"replica": position // size, "member": position % size, **run})
    first, values = runs[0], result.history.values
    for key, column in (("final_loss", "loss"), ("final_acc", "acc")):
        if key not in first and column in values:
            first[key] = values[column][-1]
    for key, prefix in (("final_grad_norm", GRAD_PREFIX), ("final_zero_fraction", ZERO_PREFIX)):
        layers = _last_layers(result.history, prefix)
        if key not in first and layers:
            first[key] = layers
        # JSON objects come back in the writer's key order (write_json sorts them); the
        # layers' forward order, input to output, is history.csv's column order.
        for run in runs:
            if isinstance(run.get(key), dict):
                run[key] = _forward_order(run[key], list(layers))
    return runs


def _forward_order(values: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``values`` with the layers of ``order`` first, in that order, then any others."""
    ranked = {layer: values[layer] for layer in order if layer in values}
    return {**ranked, **{k: v for k, v in values.items() if k not in ranked}}
