"""Performance profiles of the compare pipeline (AlgoPerf's question, time to a target): how
many of an optimizer's seeds have reached a validation accuracy by each epoch, as a table
and a figure (pure).

A seed counts from the first epoch its val_acc reaches the target on (its running maximum
reaches it then); an early-stopped seed keeps what it reached, a diverged one never
reaches. Every seed is in the denominator, so divergence shows as a lower curve."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["epochs_to_target", "profile_figure", "profile_fractions", "profile_table", "reached_at"]

Runs = Mapping[str, Any]  # runs/<settings>.json
NEVER = "never"
SETTINGS_STYLES = (("tuned", "-"), ("default", "--"))  # tuned solid, default dashed


def reached_at(run: Mapping[str, Any], target: float) -> int | None:
    """The first epoch (1-based) whose val_acc is at least ``target``; None if none did
    (a diverged run never does, an early-stopped one keeps what it reached)."""
    if run["diverged"]:
        return None
    for epoch, value in enumerate(run["val_acc"], start=1):
        if value >= target:
            return epoch
    return None


def profile_fractions(entry: Mapping[str, Any], target: float, epochs: int) -> list[float]:
    """For k = 1..epochs, the fraction of the optimizer's seeds at ``target`` by epoch k."""
    runs = entry["runs"]
    if not runs:
        return [0.0] * epochs
    reached = [reached_at(run, target) for run in runs]
    return [
        sum(r is not None and r <= k for r in reached) / len(runs) for k in range(1, epochs + 1)
    ]


def epochs_to_target(entry: Mapping[str, Any], target: float) -> float | None:
    """The median over the seeds of the epoch each reached ``target`` (one that never did
    counts as later than any), or None when fewer than half reached it."""
    runs = entry["runs"]
    reached = [reached_at(run, target) for run in runs]
    hits = sorted(r for r in reached if r is not None)
    if not runs or 2 * len(hits) < len(runs):
        return None
    never = float("inf")
    ordered = hits + [never] * (len(runs) - len(hits))
    median = statistics.median(ordered)
    return None if median == never else float(median)


def profile_table(default: Runs, tuned: Runs, target: float) -> list[str]:
    """Markdown rows: per optimizer and settings, the fraction of seeds at ``target`` by
    each epoch, and the median epochs to it ("never": fewer than half the seeds got there)."""
    epochs = int(tuned["epochs"])
    header = " | ".join(str(k) for k in range(1, epochs + 1))
    lines = [
        f"| optimizer | settings | {header} | median epochs to {target:g} |",
        "|---|---|" + "---:|" * epochs + "---:|",
    ]
    for name in tuned["optimizers"]:
        for settings, runs in (("default", default), ("tuned", tuned)):
            entry = runs["optimizers"][name]
            cells = " | ".join(f"{f:.2f}" for f in profile_fractions(entry, target, epochs))
            median = epochs_to_target(entry, target)
            reached = NEVER if median is None else f"{median:g}"
            lines.append(f"| {name} | {settings} | {cells} | {reached} |")
    return lines


def profile_figure(default: Runs, tuned: Runs, target: float) -> Figure:
    """The performance profile: per optimizer the fraction of seeds at the target val_acc
    by epoch, tuned solid and default dashed, one colour per optimizer."""
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    epochs = int(tuned["epochs"])
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    axis = fig.add_subplot()
    steps = list(range(1, epochs + 1))
    for index, name in enumerate(tuned["optimizers"]):
        colour = f"C{index % 10}"
        for settings, style in SETTINGS_STYLES:
            runs = tuned if settings == "tuned" else default
            fractions = profile_fractions(runs["optimizers"][name], target, epochs)
            axis.step(
                steps, fractions, where="post", linestyle=style, color=colour,
                label=f"{name} {settings}",
            )  # fmt: skip
    axis.set_ylim(-0.02, 1.02)
    axis.set_xticks(steps)
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"fraction of seeds at val_acc ≥ {target:g}")
    seeds = len(tuned["seeds"])
    axis.set_title(f"Performance profile over {seeds} seeds (tuned solid, default dashed)")
    axis.grid(True)
    axis.legend(fontsize="small", ncols=2)
    return fig
