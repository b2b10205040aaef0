"""The ``report`` stage: reports/lecture.md and its plots, from the DVC metrics/plots files.

It reads only what the pipeline wrote (``metrics/<name>/{train,eval}.json``,
``plots/<name>/history.csv``, ``data/prepared/meta.json``), never MLflow, so the report is
reproducible offline. The output is deterministic: fixed number formats, no timestamps, and
PNGs rendered with matplotlib's default style and without the Software metadata, so the same
inputs give the same bytes.

One table row per experiment: test accuracy, best validation accuracy, epochs run, stop
reason and training seconds (mean ± sample std over replicas when ``matrix.seeds`` > 1),
beside the lecture's MNIST test accuracy for the same setting (``LECTURE``).

Experiments with ``model.name: resnet`` (plain_20 and resnet_20: the same 20 layers with and
without skip connections) also get a "Going deeper" table (final training loss and accuracy,
test accuracy, the first layer's gradient norm over the last's) and their own gradient-norm
plot, ``deep_grad_norms.png``, apart from the MLPs' ``grad_norms.png``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.style
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepopt import paths
from deepopt.config import Params, resolve_experiment
from deepopt.errors import DataError
from deepopt.files import check_writable, write_bytes, write_text

__all__ = [
    "BEST_EXPERIMENT",
    "LECTURE",
    "REPORT_DIR",
    "DeepRow",
    "ExperimentResult",
    "History",
    "LectureFigure",
    "Stat",
    "Summary",
    "deep_rows",
    "difference_notes",
    "experiment_names",
    "grad_norm_figure",
    "group_identical",
    "layer_order",
    "load_experiment",
    "lr_figure",
    "main",
    "parse_history",
    "png_bytes",
    "render_markdown",
    "summarize",
    "val_loss_figure",
]

REPORT_DIR = Path("reports")
REPORT_FILE = "lecture.md"
PLOT_FILES = {
    "val_loss": "val_loss.png",
    "lr": "lr.png",
    "grad_norms": "grad_norms.png",
    "deep_grad_norms": "deep_grad_norms.png",
}
BEST_EXPERIMENT = "train_best"  # written by the tune stage from the study's best params
BASE_EXPERIMENT = "base"  # what `deepopt train` writes when params.yaml has no experiments
LECTURE_DATASET = "mnist"
MISSING = "—"


class LectureFigure(NamedTuple):
    setting: str
    test_acc: float | None  # the lecture's MNIST test accuracy; None: it reports none
    epochs: int | None  # epochs the lecture's run trained (early stopping included)


# Lecture 10a's settings and MNIST results (its "test accuracy:" outputs; the nobn_* figures
# are the ones it compares against: L2 0.966, dropout 0.968, ensemble 0.970).
LECTURE: dict[str, LectureFigure] = {
    "bn_sgd_earlystop": LectureFigure(
        "BN CNN, SGD lr 0.02, Nesterov 0.9, batch 50, early stopping (val_loss, 1e-4, 5), "
        "≤100 epochs",
        0.9804,
        25,
    ),
    "bn_sgd_decay": LectureFigure(
        "BN CNN, Nesterov SGD, inverse-time decay δ=1e-5 per batch, no early stopping",
        0.9805,
        50,
    ),
    "bn_sgd_plateau": LectureFigure(
        "BN CNN, Nesterov SGD, ReduceLROnPlateau (val_loss, factor 0.1, patience 5)",
        0.9803,
        50,
    ),
    "bn_sgd_linear": LectureFigure("BN CNN, Nesterov SGD, linear LR 0.02 → 0.0001", 0.9799, 50),
    "bn_adam": LectureFigure("BN CNN, Adam lr 0.01, early stopping", 0.9608, 12),
    "nobn_l2": LectureFigure("CNN without BN, L2 regularization", 0.966, None),
    "nobn_dropout": LectureFigure("CNN without BN, dropout", 0.968, None),
    "nobn_ensemble": LectureFigure("CNN without BN, 5-member ensemble", 0.970, None),
    "bn_sgd": LectureFigure("BN CNN, plain SGD", None, None),
    "bn_momentum": LectureFigure("BN CNN, SGD with momentum", None, None),
    "bn_adagrad": LectureFigure("BN CNN, AdaGrad", None, None),
    "bn_rmsprop": LectureFigure("BN CNN, RMSProp", None, None),
    "vanishing_sigmoid": LectureFigure("deep MLP, sigmoid, per-layer gradient norms", None, None),
    "vanishing_relu": LectureFigure("deep MLP, ReLU, per-layer gradient norms", None, None),
    "vanishing_relu_bn": LectureFigure("deep MLP, ReLU + BN, per-layer gradient norms", None, None),
    BEST_EXPERIMENT: LectureFigure("BN CNN with the Optuna study's best params", None, None),
    "plain_20": LectureFigure("20-layer plain CNN (ResNet without skips), BN", None, None),
    "resnet_20": LectureFigure("20-layer ResNet, BN (He et al. 2016)", None, None),
}

_RUN_KEYS = ("seed", "epochs_run", "stop_reason", "best_val_acc", "train_seconds")
_HISTORY_COLUMNS = ("epoch", "val_loss", "lr")
_GRAD_PREFIX = "grad_norm/"


# ---------------------------------------------------------------------------- data


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


def _missing(path: Path, writer: str) -> DataError:
    return DataError(f"{path} is missing: run `dvc repro` (the {writer} stage writes it)")


def _read_json(path: Path, writer: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise _missing(path, writer) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err}); run `dvc repro`") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _cell(text: str | None) -> float:
    # An empty cell is a column an epoch did not record (csv.DictWriter's restval "").
    return math.nan if text is None or text == "" else float(text)


def parse_history(text: str, source: str) -> History:
    """The columns of a history.csv as floats (pure); DataError naming ``source`` if bad."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{source}: empty file; run `dvc repro`")
    absent = [column for column in _HISTORY_COLUMNS if column not in header]
    if absent:
        raise DataError(
            f"{source}: missing column(s) {', '.join(absent)}; the header has {', '.join(header)}"
        )
    values: dict[str, list[float]] = {column: [] for column in header}
    for line, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise DataError(f"{source}: line {line} has {len(row)} cells, the header {len(header)}")
        try:
            for column, cell in zip(header, row, strict=True):
                values[column].append(_cell(cell))
        except ValueError:
            raise DataError(f"{source}: line {line} holds a value that is not a number") from None
    if not values["epoch"]:
        raise DataError(f"{source}: no epochs recorded; run `dvc repro`")
    return History(columns=tuple(header), values=values)


def _read_history(path: Path) -> History:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(path, "train") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({err}); run `dvc repro`") from None
    return parse_history(text, str(path))


def load_experiment(name: str) -> ExperimentResult:
    """Read an experiment's train.json, eval.json and history.csv (relative to the cwd)."""
    return ExperimentResult(
        name=name,
        train=_read_json(paths.train_metrics_path(name), "train"),
        evaluation=_read_json(paths.eval_metrics_path(name), "evaluate"),
        history=_read_history(paths.history_path(name)),
    )


def experiment_names(params: Params, root: Path = Path(".")) -> list[str]:
    """params.yaml's experiments in their order (the base run when there are none), then
    train_best when the tune stage has trained it."""
    names = list(params.experiments) or [BASE_EXPERIMENT]
    if BEST_EXPERIMENT not in names and (root / paths.train_metrics_path(BEST_EXPERIMENT)).exists():
        names.append(BEST_EXPERIMENT)
    return names


def _dataset(meta: Mapping[str, Any]) -> str:
    for key in ("dataset", "name"):
        if isinstance(meta.get(key), str):
            return str(meta[key])
    raise DataError(f"{paths.meta_path()}: has no 'dataset' name; run `dvc repro`")


# ------------------------------------------------------------------------ summary


def _number(data: Mapping[str, Any], key: str, source: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{source}: '{key}' is {value!r}, expected a finite number")
    return float(value)


def _runs(train: Mapping[str, Any], source: str) -> list[Mapping[str, Any]]:
    runs = train.get("runs", [train])
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise DataError(f"{source}: 'runs' must be a non-empty list of objects")
    for run in runs:
        absent = [key for key in _RUN_KEYS if key not in run]
        if absent:
            raise DataError(f"{source}: a run lacks {', '.join(absent)}; run `dvc repro`")
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
            f"{source}: ensemble_size {size!r} does not divide the {runs} trained runs; "
            "run `dvc repro`"
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


# ----------------------------------------------------------------------- markdown


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
        first, last = (values[_GRAD_PREFIX + layers[i]][-1] for i in (0, -1)) if layers else (0, 0)
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


def _deep_section(rows: Sequence[DeepRow], plot_file: str | None) -> list[str]:
    lines = [
        "## Going deeper: plain vs residual",
        "",
        "The same layers with and without the skip connections (`model.skip`). A deeper "
        "plain stack trains worse, not only generalizes worse (He et al.'s degradation): "
        "compare the training loss. Gradient ratio: the first layer's mean gradient norm "
        "over the logits' in the last epoch.",
        "",
        f"Only {_count_list(sorted({row.epochs for row in rows}))} epochs (train.epochs, "
        "kept short for `make repro`'s time budget; He et al. train 64,000 iterations, "
        "about 160 epochs): these are the first epochs of training.",
        "",
        "| experiment | depth | skip | BN | epochs | final train loss | final train acc | "
        "test acc | gradient first / last |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            f"`{row.name}`",
            str(row.depth),
            "yes" if row.skip else "no",
            "yes" if row.batchnorm else "no",
            str(row.epochs),
            f"{row.final_loss:.4f}",
            f"{row.final_acc:.4f}",
            row.test_acc.format(4),
            MISSING if math.isnan(row.grad_ratio) else f"{row.grad_ratio:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if plot_file is not None:
        lines += [
            "Mean gradient norm of each layer's weights, first and last epoch:",
            "",
            f"![gradient norm by layer, plain vs residual]({plot_file})",
            "",
        ]
    return lines


def _count_list(counts: Sequence[int]) -> str:
    return " / ".join(str(n) for n in counts)


def _stop_reasons(reasons: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(reasons))  # first-appearance order
    if len(distinct) == 1:
        return distinct[0]
    return ", ".join(f"{reason} ({reasons.count(reason)})" for reason in distinct)


def _epochs(stat: Stat) -> str:
    whole = stat.std is None and stat.mean.is_integer()
    return stat.format(0) if whole else stat.format(1)


def _lecture_acc(name: str) -> str:
    figure = LECTURE.get(name)
    if figure is None or figure.test_acc is None:
        return MISSING
    return f"{figure.test_acc:g}"  # as the lecture prints it (0.966, 0.9804)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table(summaries: Sequence[Summary], lecture_header: str) -> list[str]:
    header = [
        "experiment",
        "setting",
        "test acc",
        "best val acc",
        "epochs run",
        "stop reason",
        "train s",
        lecture_header,
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for s in summaries:
        figure = LECTURE.get(s.name)
        cells = [
            f"`{s.name}`",
            _escape(figure.setting) if figure else MISSING,
            s.test_acc.format(4),
            s.best_val_acc.format(4),
            _epochs(s.epochs_run),
            _stop_reasons(s.stop_reasons),
            s.train_seconds.format(1),
            _lecture_acc(s.name),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def difference_notes(dataset: str, summaries: Sequence[Summary]) -> list[str]:
    """How these runs differ from the lecture's, derived from the data (pure)."""
    notes = []
    if dataset != LECTURE_DATASET:
        notes.append(
            f"Data set: these runs use {dataset}; the lecture's figures are MNIST test "
            "accuracies, so compare how the settings rank, not the numbers."
        )
    for s in summaries:
        figure = LECTURE.get(s.name)
        capped = all(reason == "max_epochs" for reason in s.stop_reasons)
        if figure and figure.epochs is not None and capped and s.epochs_run.mean < figure.epochs:
            notes.append(
                f"`{s.name}` ran {_epochs(s.epochs_run)} epochs, capped by train.epochs for "
                f"the time budget; the lecture's run trained {figure.epochs}."
            )
    return notes


def _reading_notes(summaries: Sequence[Summary]) -> list[str]:
    """How to read the table's ± and ensemble rows, only when there are such rows (pure)."""
    notes = []
    replicated = sorted({s.replicas for s in summaries if s.replicas > 1})
    if replicated:
        counts = ", ".join(str(n) for n in replicated)
        notes.append(
            "± is the sample standard deviation over an experiment's replicas "
            f"(matrix.seeds: n = {counts})."
        )
    ensembles = [f"`{s.name}`" for s in summaries if s.ensemble_size > 1]
    if ensembles:
        notes.append(
            f"Ensembles ({', '.join(ensembles)}): test acc is the ensemble's; best val acc "
            "and epochs run are its members' mean, train s their sum."
        )
    return notes


def _data_line(dataset: str, meta: Mapping[str, Any]) -> str:
    line = f"Data: {dataset}"
    counts = meta.get("counts")
    if isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in ("train", "val")):
        split = f"{counts['train']} train / {counts['val']} validation"
        if isinstance(counts.get("test"), int):
            split += f" / {counts['test']} test"
        line += f" ({split} images)"
    digest = meta.get("digest")
    if isinstance(digest, str) and digest:
        line += f", prepared data digest `{digest[:12]}`"
    return line + "."


def render_markdown(
    summaries: Sequence[Summary],
    dataset: str,
    meta: Mapping[str, Any],
    plot_files: Mapping[str, str],
    deep: Sequence[DeepRow] = (),
) -> str:
    """The whole of reports/lecture.md (pure: same inputs, same text)."""
    lecture_header = "lecture" if dataset == LECTURE_DATASET else "lecture (MNIST)"
    lines = [
        "# Lecture 10a experiments",
        "",
        _data_line(dataset, meta),
        "Test accuracy from `metrics/<experiment>/eval.json`; the other columns from "
        "`metrics/<experiment>/train.json`; the last column is the lecture's test accuracy "
        f"for the same setting ({MISSING}: the lecture gives none).",
        "",
        *_table(summaries, lecture_header),
        "",
    ]
    reading = _reading_notes(summaries)
    if reading:
        lines += [" ".join(reading), ""]
    notes = difference_notes(dataset, summaries)
    if notes:
        lines += ["Differences from the lecture:", "", *(f"- {note}" for note in notes), ""]
    first_runs = ", ".join(
        f"`{s.name}` seed {s.first_seed}"
        for s in summaries
        if s.replicas > 1 or s.ensemble_size > 1
    )
    lines += [
        "## Plots",
        "",
        "Curves are each experiment's first run"
        + (f" ({first_runs})." if first_runs else ".")
        + " Epochs count from 1.",
        "",
        "Validation loss of every experiment:",
        "",
        f"![validation loss against epoch]({plot_files['val_loss']})",
        "",
        "Learning rate at the start of each epoch (the schedules side by side):",
        "",
        f"![learning rate against epoch]({plot_files['lr']})",
        "",
    ]
    if "grad_norms" in plot_files:
        lines += [
            "Mean gradient norm of each layer's weights in the first and the last epoch "
            "(the vanishing-gradient study):",
            "",
            f"![gradient norm by layer]({plot_files['grad_norms']})",
            "",
        ]
    else:
        lines += [
            "No experiment recorded per-layer gradient norms (train.diagnostics), "
            "so there is no gradient-norm plot.",
            "",
        ]
    if deep:
        lines += _deep_section(deep, plot_files.get("deep_grad_norms"))
    return "\n".join(lines)


# -------------------------------------------------------------------------- plots


def _style(index: int) -> dict[str, Any]:
    """Ten colours, then the same colours dashed, dotted, ...: distinct for ~40 lines."""
    colors = [colormaps["tab10"](i) for i in range(10)]
    linestyles = ("-", "--", ":", "-.")
    return {
        "color": colors[index % len(colors)],
        "linestyle": linestyles[(index // len(colors)) % len(linestyles)],
    }


def _legend_outside(axis: Axes) -> None:
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _log_if_wide(axis: Axes, values: Sequence[float]) -> None:
    """A log y axis when the values are positive and span a decade or more."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) >= 10 * min(finite):
        axis.set_yscale("log")


def _epoch_axis(history: History) -> list[float]:
    return [epoch + 1 for epoch in history.values["epoch"]]  # history counts from 0


def group_identical(histories: Mapping[str, History], column: str) -> list[list[str]]:
    """Experiments whose ``column`` curves coincide (one a prefix of the other, as a run
    that stopped earlier on the same schedule), in first-appearance order (pure)."""
    groups: list[list[str]] = []
    for name, history in histories.items():
        curve = history.values[column]
        for group in groups:
            other = histories[group[0]].values[column]
            overlap = min(len(curve), len(other))
            if curve[:overlap] == other[:overlap]:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _overlay(
    histories: Mapping[str, History], groups: Sequence[Sequence[str]], column: str
) -> tuple[Figure, Axes]:
    """One line per group, drawn from its longest history and labelled with its names."""
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    axis = fig.add_subplot()
    for index, names in enumerate(groups):
        longest = max((histories[name] for name in names), key=lambda h: len(h.values["epoch"]))
        label = textwrap.fill(", ".join(names), width=40)
        axis.plot(_epoch_axis(longest), longest.values[column], label=label, **_style(index))
    _log_if_wide(axis, [v for h in histories.values() for v in h.values[column]])
    axis.set_xlabel("epoch")
    axis.grid(True, which="major")
    _legend_outside(axis)
    return fig, axis


def val_loss_figure(histories: Mapping[str, History]) -> Figure:
    """Validation loss against epoch, all experiments overlaid."""
    fig, axis = _overlay(histories, [[name] for name in histories], "val_loss")
    axis.set_ylabel("validation loss")
    axis.set_title("Validation loss")
    return fig


def lr_figure(histories: Mapping[str, History]) -> Figure:
    """Learning rate (at each epoch's start) against epoch, all experiments overlaid; the
    experiments sharing a schedule share a line, so no schedule hides another."""
    fig, axis = _overlay(histories, group_identical(histories, "lr"), "lr")
    axis.set_ylabel("learning rate")
    axis.set_title("Learning-rate schedules")
    return fig


def layer_order(history: History) -> list[str]:
    """The layers with a grad_norm column, in header order: train writes them in the
    order the forward pass reaches them, input to output."""
    return [c.removeprefix(_GRAD_PREFIX) for c in history.columns if c.startswith(_GRAD_PREFIX)]


def grad_norm_figure(histories: Mapping[str, History]) -> Figure:
    """Per-layer gradient norm in the first and the last epoch, one line per experiment
    (only experiments whose history has grad_norm columns)."""
    layered = {name: layer_order(h) for name, h in histories.items() if layer_order(h)}
    orders = {tuple(layers) for layers in layered.values()}
    shared = next(iter(orders)) if len(orders) == 1 else None  # else the x axis is the depth
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for panel, (axis, row) in enumerate(zip(axes, (0, -1), strict=True)):
        norms: list[float] = []
        for index, (name, layers) in enumerate(layered.items()):
            history = histories[name]
            values = [history.values[_GRAD_PREFIX + layer][row] for layer in layers]
            norms += values
            epoch = int(history.values["epoch"][row]) + 1
            label = name if panel == 0 else f"{name} (epoch {epoch})"
            axis.plot(range(1, len(layers) + 1), values, marker="o", label=label, **_style(index))
        _log_if_wide(axis, norms)
        if shared is not None:
            axis.set_xticks(range(1, len(shared) + 1), shared, rotation=45, ha="right")
        axis.set_xlabel("layer (input → output)")
        axis.set_title("first epoch" if panel == 0 else "last epoch")
        axis.grid(True, which="major")
    axes[0].set_ylabel("mean gradient norm of the weights")
    _legend_outside(axes[1])
    return fig


def png_bytes(build: Callable[[], Figure]) -> bytes:
    """Render a figure to PNG bytes that depend only on the data.

    matplotlib's default style (not the user's matplotlibrc) and no Software metadata (it
    names the matplotlib version); PNGs carry no timestamp unless asked to.
    """
    with matplotlib.style.context("default"):
        figure = build()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------- main


def main(params: Params, **_: object) -> dict[str, Any]:
    check_writable(REPORT_DIR / REPORT_FILE, *(REPORT_DIR / name for name in PLOT_FILES.values()))
    names = experiment_names(params)
    results = [load_experiment(name) for name in names]
    meta = _read_json(paths.meta_path(), "prepare")
    dataset = _dataset(meta)
    summaries = [summarize(result) for result in results]
    histories = {result.name: result.history for result in results}
    deep = deep_rows(params, results, summaries)
    # The resnets' 20 layers get their own plot: beside the MLPs' 11 the x axis would be
    # a bare depth index.
    by_depth = {
        "grad_norms": {n: h for n, h in histories.items() if n not in {r.name for r in deep}},
        "deep_grad_norms": {r.name: histories[r.name] for r in deep},
    }

    figures: dict[str, Callable[[], Figure]] = {
        "val_loss": lambda: val_loss_figure(histories),
        "lr": lambda: lr_figure(histories),
    }
    for key, group in by_depth.items():
        if any(layer_order(history) for history in group.values()):
            figures[key] = functools.partial(grad_norm_figure, group)
        else:  # no stale plot from an earlier run beside a report that does not link it
            (REPORT_DIR / PLOT_FILES[key]).unlink(missing_ok=True)
    plot_files = {key: PLOT_FILES[key] for key in figures}
    for key, build in figures.items():
        write_bytes(REPORT_DIR / plot_files[key], png_bytes(build))
    report = REPORT_DIR / REPORT_FILE
    write_text(report, render_markdown(summaries, dataset, meta, plot_files, deep))
    return {
        "stage": "report",
        "report": str(report),
        "plots": [str(REPORT_DIR / name) for name in plot_files.values()],
        "experiments": names,
        "dataset": dataset,
    }
