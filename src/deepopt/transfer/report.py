"""The transfer table, plot and report.md from finetune's runs (pure: same results, same
text and figure).

Every fine-tune ran once per seed (``transfer.seeds``), and the modes of one size and seed
saw the same labelled images, head initialisation and batch order: a cell of the table is
the mean test accuracy over the seeds with its 95 % Student-t interval, and the modes
compare pairwise by seed. The claim "a pretrained backbone helps most when labels are
few" is tested on the gain over scratch: per seed, the gain (backbone mode − scratch) at
the smallest target size minus the gain at the largest, a one-sided paired t test that
it is above 0 (``deepopt.stats``, the report's statistics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepopt.stats import (
    ALPHA,
    Interval,
    PairedResult,
    format_p,
    holm,
    mean_interval,
    paired_difference,
    verdict,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BACKBONE_MODES",
    "MODE_LABELS",
    "ClaimRow",
    "GainRow",
    "accuracy_figure",
    "cell_accuracies",
    "claim_rows",
    "claim_table",
    "gain_rows",
    "gain_table",
    "render_report",
    "transfer_table",
]

MODE_LABELS = {
    "linear_probe": "linear probe",
    "finetune": "fine-tune",
    "scratch": "from scratch",
}
BASELINE = "scratch"
# The modes that start from the pretrained backbone, each compared with scratch.
BACKBONE_MODES = ("finetune", "linear_probe")
CLAIM = "a pretrained backbone helps most when labels are few"
MISSING = "—"

Accuracies = dict[tuple[str, int], dict[int, float]]  # (mode, per_class) -> {seed: test_acc}


def _label(mode: str) -> str:
    return MODE_LABELS.get(mode, mode)


def _modes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["mode"]) for r in runs))


def _sizes(runs: Sequence[Mapping[str, Any]]) -> list[int]:
    return sorted({int(r["per_class"]) for r in runs})


def cell_accuracies(runs: Sequence[Mapping[str, Any]]) -> Accuracies:
    """Every size x mode's test accuracies by seed."""
    cells: Accuracies = {}
    for run in runs:
        key = (str(run["mode"]), int(run["per_class"]))
        cells.setdefault(key, {})[int(run["seed"])] = float(run["test_acc"])
    return cells


def _paired(cells: Accuracies, *keys: tuple[str, int]) -> list[list[float]]:
    """The accuracies of ``keys``' cells on the seeds all of them ran, seed by seed."""
    found = [cells.get(key, {}) for key in keys]
    seeds = sorted(set.intersection(*(set(cell) for cell in found)))
    return [[cell[seed] for seed in seeds] for cell in found]


def _signed(interval: Interval) -> str:
    """A difference: "+0.1200 ± 0.0300" (the mean alone without an interval)."""
    if interval.n == 0:
        return MISSING
    return interval.format(4, signed=True)


def transfer_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: labelled images per class x mode -> mean test accuracy ± the 95 %
    Student-t half-width over the seeds, and n (the seeds)."""
    cells = cell_accuracies(runs)
    modes = _modes(runs)
    header = ["labelled / class", *(_label(m) for m in modes)]
    lines = ["| " + " | ".join(header) + " |", "|---:|" + "---:|" * len(modes)]
    for size in _sizes(runs):
        row = [str(size)]
        for mode in modes:
            accuracies = list(cells.get((mode, size), {}).values())
            interval = mean_interval(accuracies)
            row.append(MISSING if not accuracies else f"{interval.format()} (n = {interval.n})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


@dataclass(frozen=True)
class GainRow:
    """A backbone mode's paired gain over scratch at one size, and its p after Holm."""

    mode: str
    per_class: int
    result: PairedResult
    p_holm: float


def gain_rows(runs: Sequence[Mapping[str, Any]]) -> list[GainRow]:
    """Per size and backbone mode, mode − scratch paired by seed (two-sided paired t),
    Holm-corrected across all the rows."""
    cells = cell_accuracies(runs)
    modes = _modes(runs)
    if BASELINE not in modes:
        return []
    found = []
    for size in _sizes(runs):
        for mode in (m for m in BACKBONE_MODES if m in modes):
            ours, scratch = _paired(cells, (mode, size), (BASELINE, size))
            found.append((mode, size, paired_difference(ours, scratch)))
    adjusted = holm([result.p_value for _, _, result in found])
    return [
        GainRow(mode, size, result, p)
        for (mode, size, result), p in zip(found, adjusted, strict=True)
    ]


def gain_table(rows: Sequence[GainRow]) -> list[str]:
    lines = [
        "| labelled / class | gain | difference (95 % CI) | n | p (paired t) | p (Holm) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.per_class} | {_label(row.mode)} − {_label(BASELINE)} | "
            f"{_signed(row.result.difference)} | {row.result.n} | {format_p(row.result.p_value)} | "
            f"{format_p(row.p_holm)} |"
        )
    return lines


@dataclass(frozen=True)
class ClaimRow:
    """The claim for one backbone mode: its gain at the smallest and the largest size,
    the paired test of their difference, and the verdict."""

    mode: str
    smallest: int
    largest: int
    gain_small: Interval
    gain_large: Interval
    result: PairedResult  # gain at smallest − gain at largest, one-sided ("greater")
    p_holm: float
    verdict: str


def claim_rows(runs: Sequence[Mapping[str, Any]]) -> list[ClaimRow]:
    """Per backbone mode: "the gain over scratch at the smallest size is larger than at the
    largest", per seed (gain_small − gain_large), one-sided paired t; Holm across the rows.
    Supported when that rejects, the whole interval is above 0 and the gain at the smallest
    size is itself significantly above 0 (one-sided paired t, Holm across the rows: a
    backbone that never helps but hurts less at few labels does not "help most"),
    contradicted when the two-sided test rejects and the whole interval is below 0, else
    inconclusive at n."""
    modes, sizes = _modes(runs), _sizes(runs)
    if BASELINE not in modes or len(sizes) < 2:
        return []
    cells = cell_accuracies(runs)
    small, large = sizes[0], sizes[-1]
    found = []
    for mode in (m for m in BACKBONE_MODES if m in modes):
        ours_s, base_s, ours_l, base_l = _paired(
            cells, (mode, small), (BASELINE, small), (mode, large), (BASELINE, large)
        )
        gain_s = [a - b for a, b in zip(ours_s, base_s, strict=True)]
        gain_l = [a - b for a, b in zip(ours_l, base_l, strict=True)]
        found.append(
            (
                mode,
                mean_interval(gain_s),
                mean_interval(gain_l),
                paired_difference(gain_s, gain_l, alternative="greater"),
                paired_difference(gain_s, gain_l).p_value,
                paired_difference(ours_s, base_s, alternative="greater").p_value,
            )
        )
    one_sided = holm([f[3].p_value for f in found])
    two_sided = holm([f[4] for f in found])
    helps_small = holm([f[5] for f in found])
    rows = []
    for (mode, gain_s_ci, gain_l_ci, result, _, _), p_one, p_two, p_small in zip(
        found, one_sided, two_sided, helps_small, strict=True
    ):
        said = verdict(result.difference, p_holm=p_one, p_two_sided_holm=p_two, side="greater")
        if said == "supported" and not (p_small < ALPHA and gain_s_ci.low > 0):
            said = f"inconclusive at n = {result.n}"
        rows.append(ClaimRow(mode, small, large, gain_s_ci, gain_l_ci, result, p_one, said))
    return rows


def claim_table(rows: Sequence[ClaimRow]) -> list[str]:
    lines = [
        "| claim | backbone | gain at the smallest size | gain at the largest | "
        "difference (95 % CI) | n | p (paired t, one-sided) | p (Holm) | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {CLAIM} | {_label(row.mode)} | {row.smallest} / class: "
            f"{_signed(row.gain_small)} | {row.largest} / class: {_signed(row.gain_large)} | "
            f"{_signed(row.result.difference)} | {row.result.n} | {format_p(row.result.p_value)} | "
            f"{format_p(row.p_holm)} | **{row.verdict}** |"
        )
    return lines


def accuracy_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Mean test accuracy over the seeds against labelled images per class (log axis), one
    line per mode with its 95 % interval as a band."""
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = fig.add_subplot()
    markers = {"linear_probe": "s", "finetune": "o", "scratch": "^"}
    cells = cell_accuracies(runs)
    sizes = _sizes(runs)
    seeds = max((len(cell) for cell in cells.values()), default=0)
    for mode in _modes(runs):
        points = [
            (size, mean_interval(list(cells[(mode, size)].values())))
            for size in sizes
            if (mode, size) in cells
        ]
        (line,) = axis.plot(
            [size for size, _ in points],
            [interval.mean for _, interval in points],
            marker=markers.get(mode, "x"),
            label=_label(mode),
        )
        banded = [(s, i) for s, i in points if not math.isnan(i.half_width)]
        if banded:
            axis.fill_between(
                [s for s, _ in banded],
                [i.low for _, i in banded],
                [i.high for _, i in banded],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    axis.set_xscale("log")
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("labelled training images per class")
    axis.set_ylabel("test accuracy")
    band = f", 95 % t interval over {seeds} seeds" if seeds > 1 else ""
    axis.set_title(f"Transfer: accuracy against labelled data (mean{band})")
    axis.grid(True)
    axis.legend()
    return fig


def render_report(summary: Mapping[str, Any], plot_file: str) -> str:
    """transfer/report.md from finetune's metrics (pure)."""
    source, target = summary["source"], summary["target"]
    runs = summary["runs"]
    seeds = [int(s) for s in summary["seeds"]]

    def task(part: Mapping[str, Any]) -> str:
        names = ", ".join(part["class_names"])
        return f"{part['dataset']} classes {list(part['classes'])} ({names})"

    gains, claims = gain_rows(runs), claim_rows(runs)
    pretrain_seed = f" (seed {source['seed']})" if source.get("seed") is not None else ""
    lines = [
        "# Transfer learning",
        "",
        f"Source: {task(source)}, {source['train_images']} training images; the pretrained "
        f"network reaches test accuracy {source['test_acc']:.4f} on its own task "
        f"(MLflow run `{source['run_id']}`).",
        f"Target: {task(target)}; test accuracy on all {target['test_images']} test images of "
        "its classes. Network: "
        f"`{summary['model']}`; every fine-tune trains {summary['epochs']} epochs.",
        "",
        f"Every size x mode ran once per seed ({len(seeds)} seeds: "
        f"{', '.join(map(str, seeds))}). A seed draws the labelled images, the new head's "
        "initial weights (from scratch: every layer's) and the batch order, the same for "
        "every mode, so the modes compare pairwise by seed. The pretrained backbone is one "
        f"run{pretrain_seed} for all of them: the intervals cover the labelled set, the head "
        "and the batch order, not the pretraining's own variance.",
        "",
        "Test accuracy: mean ± the half-width of its 95 % Student-t interval over the seeds "
        "(n - 1 degrees of freedom), and n.",
        "",
        *transfer_table(runs),
        "",
        f"![mean test accuracy against labelled images per class]({plot_file})",
        "",
        "Modes: linear probe = the pretrained backbone frozen (BatchNorm statistics "
        "included), only a new head learns; fine-tune = all layers learn from the pretrained "
        f"start, the backbone at {summary['backbone_lr_scale']:g} x the head's learning rate; "
        "from scratch = the same network from random weights. A seed's smaller training sets "
        "are subsets of its larger ones; a set with fewer than "
        f"{summary['min_batches']} batches is repeated within an epoch (steps per run below).",
        "",
        "## The claim",
        "",
    ]
    if gains:
        lines += [
            "Gain of a pretrained backbone over scratch per size: the paired difference in "
            "test accuracy (same seed, same labelled images), its 95 % t interval, the "
            "two-sided paired t test's p and that p Holm-corrected across the rows.",
            "",
            *gain_table(gains),
            "",
        ]
    if claims:
        lines += [
            f'"{CLAIM.capitalize()}": per seed, the gain at the smallest size minus the gain '
            "at the largest; one-sided paired t test that it is above 0, Holm-corrected "
            "across the backbones. Supported when that p is below "
            f"{ALPHA:g} and the whole interval above 0, contradicted when the two-sided test "
            "rejects and the whole interval is below 0, else inconclusive at this n.",
            "",
            *claim_table(claims),
        ]
    else:
        lines.append(
            f'"{CLAIM.capitalize()}": not tested; it needs the scratch mode, a backbone '
            "mode and at least two target sizes."
        )
    lines += [
        "",
        "## Runs",
        "",
        "| mode | labelled / class | seed | train images | repeats | steps | final val acc | "
        "test acc | train s | MLflow run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {mode: i for i, mode in enumerate(_modes(runs))}
    for run in sorted(runs, key=lambda r: (r["per_class"], order[str(r["mode"])], r["seed"])):
        lines.append(
            f"| {_label(run['mode'])} | {run['per_class']} | {run['seed']} | "
            f"{run['train_images']} | {run['repeats']} | {run['steps']} | "
            f"{run['final_val_acc']:.4f} | {run['test_acc']:.4f} | {run['train_seconds']:.1f} | "
            f"`{run['run_id']}` |"
        )
    return "\n".join(lines) + "\n"
