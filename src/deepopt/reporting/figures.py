"""The report's figures: every experiment's validation loss, learning rate and per-layer
gradient norms overlaid (``deepopt.figures.png_bytes`` renders them)."""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepopt.reporting.results import GRAD_PREFIX, History, layer_order

__all__ = [
    "grad_norm_figure",
    "group_identical",
    "lr_figure",
    "report_figures",
    "val_loss_figure",
]


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
            values = [history.values[GRAD_PREFIX + layer][row] for layer in layers]
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


def report_figures(
    histories: Mapping[str, History], deep: Collection[str]
) -> dict[str, Callable[[], Figure]]:
    """The report's figures by key (val_loss, lr, grad_norms, deep_grad_norms), as builders
    for ``png_bytes``; a gradient-norm plot only when its experiments recorded grad norms.

    The ``deep`` experiments (the resnets) get their own gradient-norm plot: beside the MLPs'
    11 layers their 20 would leave the x axis a bare depth index.
    """
    figures: dict[str, Callable[[], Figure]] = {
        "val_loss": lambda: val_loss_figure(histories),
        "lr": lambda: lr_figure(histories),
    }
    by_depth = {
        "grad_norms": {n: h for n, h in histories.items() if n not in deep},
        "deep_grad_norms": {n: h for n, h in histories.items() if n in deep},
    }
    for key, group in by_depth.items():
        if any(layer_order(history) for history in group.values()):
            figures[key] = functools.partial(grad_norm_figure, group)
    return figures
