"""reports/lecture.md as text: the experiments' table beside the lecture's figures, the
notes on how to read it, the plot links and the plain-vs-residual table (all pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deepopt.reporting.lecture import LECTURE, LECTURE_DATASET
from deepopt.reporting.results import DeepRow, Stat, Summary

__all__ = ["MISSING", "difference_notes", "render_markdown"]

MISSING = "—"


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
    """The whole of reports/lecture.md (pure: same inputs, same text).

    One table row per experiment (mean ± sample std over replicas when matrix.seeds > 1)
    beside the lecture's MNIST test accuracy for the same setting (``LECTURE``); the resnet
    experiments (plain_20, resnet_20: the same 20 layers without and with skips) also get
    the "Going deeper" table and their own gradient-norm plot.
    """
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
