"""reports/lecture.md as text: the experiments' table (mean ± 95 % t interval over
replicas) beside the lecture's figures, the notes on how to read it, the claims table, the
plot links and the plain-vs-residual table (all pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deepopt.reporting.claims import MEASURES, ClaimRow
from deepopt.reporting.figures import BAND
from deepopt.reporting.lecture import LECTURE, LECTURE_DATASET
from deepopt.reporting.results import DeepRow, Summary
from deepopt.stats import ALPHA, Interval, format_p

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
            _value(row.final_loss, 4),
            _value(row.final_acc, 4),
            _value(row.test_acc, 4),
            _value(row.grad_ratio, 3),
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


def _value(interval: Interval, digits: int) -> str:
    """Mean ± half-width of the 95 % interval; the value alone at n = 1; — at n = 0."""
    return MISSING if math.isnan(interval.mean) else interval.format(digits)


def _epochs(interval: Interval) -> str:
    """Whole epochs when every replica ran the same, else the mean ± half-width to 0.1."""
    same = math.isnan(interval.half_width) or interval.half_width == 0
    if same and interval.mean.is_integer():
        return f"{interval.mean:.0f}"
    return _value(interval, 1)


def _lecture_acc(name: str) -> str:
    figure = LECTURE.get(name)
    if figure is None or figure.test_acc is None:
        return MISSING
    return f"{figure.test_acc:g}"  # as the lecture prints it (0.966, 0.9804)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


# The results table's columns before the lecture's (whose header names its data set), and
# which of all the columns are numbers (right-aligned in both reports).
RESULTS_HEADER = (
    "experiment",
    "setting",
    "n",
    "test acc",
    "best val acc",
    "epochs run",
    "stop reason",
    "train s",
)
RESULTS_NUMERIC = (False, False, True, True, True, True, False, True, True)


def results_cells(s: Summary) -> list[str]:
    """One results row as plain text (each renderer escapes and marks it up), shared by
    lecture.md and index.html so the two never disagree on a number."""
    figure = LECTURE.get(s.name)
    return [
        s.name,
        figure.setting if figure else MISSING,
        str(s.replicas),
        _value(s.test_acc, 4),
        _value(s.best_val_acc, 4),
        _epochs(s.epochs_run),
        _stop_reasons(s.stop_reasons),
        _value(s.train_seconds, 1),
        _lecture_acc(s.name),
    ]


def _table(summaries: Sequence[Summary], lecture_header: str) -> list[str]:
    align = "|".join("---:" if numeric else "---" for numeric in RESULTS_NUMERIC)
    lines = ["| " + " | ".join([*RESULTS_HEADER, lecture_header]) + " |", f"|{align}|"]
    for s in summaries:
        name, setting, *rest = results_cells(s)
        lines.append("| " + " | ".join([f"`{name}`", _escape(setting), *rest]) + " |")
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
    """How to read the table's ± and ensemble rows (pure)."""
    notes = [
        "Each value is the mean over the experiment's n replicas (matrix.seeds; replica r "
        "trains with seed + r), ± the half-width of its 95 % confidence interval, Student t "
        "with n − 1 degrees of freedom; a row with n = 1 shows its value alone."
    ]
    ensembles = [f"`{s.name}`" for s in summaries if s.ensemble_size > 1]
    if ensembles:
        notes.append(
            f"Ensembles ({', '.join(ensembles)}): test acc is the ensemble's, one value per "
            "replica; best val acc and epochs run are its members' mean, train s their sum."
        )
    return notes


def _experiments(row: ClaimRow) -> str:
    claim = row.claim
    if claim.b is None:
        return f"`{claim.a}` vs {claim.reference:g}"
    return f"`{claim.a}` − `{claim.b}`"


def _difference(row: ClaimRow) -> str:
    if row.result is None:
        return MISSING
    return row.result.difference.format(MEASURES[row.claim.measure].digits, signed=True)


def _claim_text(row: ClaimRow) -> str:
    claim = row.claim
    if claim.b is None:
        return f"{claim.text} (H1: mean > {claim.reference:g})"
    sign = ">" if claim.side == "greater" else "<"
    bound = f"−{claim.margin:g}" if claim.margin else "0"
    return f"{claim.text} (H1: a − b {sign} {bound})"


def _claims_section(rows: Sequence[ClaimRow]) -> list[str]:
    """The claims table and how it was computed (pure)."""
    lines = [
        "## The lecture's claims",
        "",
        "One row per claim of the lecture, tested on this run's experiments. Difference: "
        "a − b replica by replica (replica r of both trained with seed + r: the same data "
        "order and, where the architectures match, the same initial weights), its mean ± "
        "the half-width of its 95 % Student-t interval; a one-sample row tests the "
        "experiment's values against the stated reference. p: the one-sided t test of the "
        "claimed side (paired, or one-sample; for a no-worse-than claim the "
        "non-inferiority test, H0: a − b ≤ −margin); p Holm: Holm-Bonferroni adjusted "
        f"across the table's rows. Supported: p Holm < {ALPHA:g} and the whole interval "
        "on the claimed side. Contradicted: the two-sided test at the same boundary, "
        "Holm-adjusted the same way, rejects and the whole interval lies on the other "
        "side. Anything else is inconclusive at this n: overlapping intervals are never "
        "counted as support. Not run: an experiment of the claim is not in this run; not "
        "measured: it ran without recording the measure (see the notes).",
        "",
        "| claim | experiments | measure | paired difference (95 % CI) | p (paired t) | "
        "p Holm | verdict | lecture |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        cells = [
            _escape(_claim_text(row)),
            _experiments(row),
            MEASURES[row.claim.measure].label,
            _difference(row),
            format_p(math.nan if row.result is None else row.result.p_value),
            format_p(row.p_holm),
            row.verdict,
            _escape(row.claim.lecture),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ranked = [row for row in rows if not math.isnan(row.wilcoxon)]
    if ranked:
        floors = ", ".join(f"{0.5**n:.3g} at n = {n}" for n in sorted({row.n for row in ranked}))
        lines += [
            "Wilcoxon signed-rank p of the same pairs and side (unadjusted, a check that does "
            "not assume normal differences; the verdicts use the t test: with n pairs the "
            f"signed-rank p is never below 1/2^n, {floors}): "
            + ", ".join(f"{_experiments(row)} {format_p(row.wilcoxon)}" for row in ranked)
            + ".",
            "",
        ]
    notes = [f"- {_experiments(row)}: {row.note}." for row in rows if row.note]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return lines


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
    claims: Sequence[ClaimRow] = (),
    lr_find: Sequence[str] = (),
) -> str:
    """The whole of reports/lecture.md (pure: same inputs, same text).

    One table row per experiment (mean ± 95 % t interval over replicas, and n) beside the
    lecture's MNIST test accuracy for the same setting (``LECTURE``), then the claims
    table (``claims``: ``reporting.claims.evaluate_claims``); the resnet
    experiments (plain_20, resnet_20: the same 20 layers without and with skips) also get
    the "Going deeper" table and their own gradient-norm plot. ``lr_find`` is the
    learning-rate section's lines (``reporting.lr_find.lr_find_lines``), last.
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
    if claims:
        lines += _claims_section(claims)
    lines += [
        "## Plots",
        "",
        "Validation loss and gradient norms: the line is the mean over an experiment's "
        f"replicas (member 0 of each, for an ensemble), the band the {BAND}; after an "
        "early-stopped replica's last epoch the mean is over the replicas still training. "
        "The learning rate is replica 0's. Epochs count from 1.",
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
    if "zero_fraction" in plot_files:
        lines += [
            "Fraction of exactly-zero ReLU outputs of each layer in the first and the last "
            "epoch (the lecture's sparsity):",
            "",
            f"![fraction of zero ReLU outputs by layer]({plot_files['zero_fraction']})",
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
    lines += lr_find
    return "\n".join(lines)
