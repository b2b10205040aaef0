"""The report's figures: every experiment's validation loss, per-layer gradient norms and
fractions of zero ReLU outputs (the mean over its replicas with their min–max band) and its
learning rate, overlaid (``deepopt.figures.png_bytes`` renders them)."""

from __future__ import annotations

import functools
import math
import statistics
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepopt.reporting.results import GRAD_PREFIX, ZERO_PREFIX, History, layer_order

__all__ = [
    "BAND",
    "grad_norm_figure",
    "group_identical",
    "lr_figure",
    "report_figures",
    "val_loss_figure",
    "zero_fraction_figure",
]

# What the shaded band around a mean curve is (the report's text says the same).
BAND = "min–max over the replicas"
_BAND_ALPHA = 0.15


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


def _spread(samples: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max at each position over the samples that reach it (an early-stopped
    replica ends sooner), nan values left out."""
    means, lows, highs = [], [], []
    for position in range(max(len(sample) for sample in samples)):
        values = [s[position] for s in samples if len(s) > position and math.isfinite(s[position])]
        means.append(statistics.fmean(values) if values else math.nan)
        lows.append(min(values) if values else math.nan)
        highs.append(max(values) if values else math.nan)
    return means, lows, highs


def _mean_with_band(
    axis: Axes,
    x: Sequence[float],
    samples: Sequence[Sequence[float]],
    label: str,
    index: int,
    **line: Any,
) -> list[float]:
    """The mean line, and the min–max band when there are several samples; returns every
    value drawn (for the axis scale)."""
    means, lows, highs = _spread(samples)
    style = _style(index)
    axis.plot(x[: len(means)], means, label=label, **style, **line)
    if len(samples) > 1:
        axis.fill_between(
            x[: len(means)], lows, highs, color=style["color"], alpha=_BAND_ALPHA, linewidth=0
        )
    return [*lows, *highs]


def _continues(short: Sequence[float], long: Sequence[float]) -> bool:
    """``long`` is ``short`` with its last value held: what the shorter run (stopped earlier
    on the same constant tail) would have drawn had it gone on."""
    return list(long[: len(short)]) == list(short) and all(
        v == short[-1] for v in long[len(short) :]
    )


def group_identical(histories: Mapping[str, History], column: str) -> list[list[str]]:
    """Experiments that draw one ``column`` curve, in first-appearance order (pure): equal
    curves, or a run that stopped earlier on the longest one's constant tail. A curve
    that changes after a shorter one ends (a plateau's drop) is a curve of its own."""
    groups: list[list[str]] = []
    for name, history in histories.items():
        curve = history.values[column]
        for group in groups:
            curves = [histories[member].values[column] for member in group] + [curve]
            longest = max(curves, key=len)
            if all(_continues(other, longest) for other in curves):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _axes_done(axis: Axes, values: Sequence[float]) -> None:
    _log_if_wide(axis, values)
    axis.set_xlabel("epoch")
    axis.grid(True, which="major")
    _legend_outside(axis)


def val_loss_figure(curves: Mapping[str, Sequence[History]]) -> Figure:
    """Validation loss against epoch, all experiments overlaid: each the mean over its
    replicas' curves with their min–max band."""
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    axis = fig.add_subplot()
    drawn: list[float] = []
    for index, (name, histories) in enumerate(curves.items()):
        longest = max(histories, key=lambda h: len(h.values["epoch"]))
        samples = [h.values["val_loss"] for h in histories]
        drawn += _mean_with_band(axis, _epoch_axis(longest), samples, name, index)
    _axes_done(axis, drawn)
    axis.set_ylabel("validation loss")
    axis.set_title("Validation loss")
    return fig


def lr_figure(histories: Mapping[str, History]) -> Figure:
    """Learning rate (at each epoch's start) against epoch, all experiments overlaid; one
    line and one legend entry per distinct curve, labelled with the experiments drawing it,
    so no schedule hides another."""
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    axis = fig.add_subplot()
    for index, names in enumerate(group_identical(histories, "lr")):
        longest = max((histories[name] for name in names), key=lambda h: len(h.values["epoch"]))
        label = textwrap.fill(", ".join(names), width=40)
        axis.plot(_epoch_axis(longest), longest.values["lr"], label=label, **_style(index))
    _axes_done(axis, [v for h in histories.values() for v in h.values["lr"]])
    axis.set_ylabel("learning rate")
    axis.set_title("Learning-rate schedules")
    return fig


def _layers(history: History, prefix: str) -> list[str]:
    """The layers with a ``prefix`` column, in header order (train writes them in forward
    order, input to output)."""
    return [c.removeprefix(prefix) for c in history.columns if c.startswith(prefix)]


def _per_layer_figure(
    curves: Mapping[str, Sequence[History]], prefix: str, ylabel: str, *, log: bool
) -> Figure:
    """Column ``prefix``<layer> by layer in the first and the last epoch, one line per
    experiment: the mean over its replicas with their min–max band (only experiments
    whose history has such columns; the last epoch is each replica's own)."""
    layered = {
        name: _layers(histories[0], prefix)
        for name, histories in curves.items()
        if _layers(histories[0], prefix)
    }
    orders = {tuple(layers) for layers in layered.values()}
    shared = next(iter(orders)) if len(orders) == 1 else None  # else the x axis is the depth
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for panel, (axis, row) in enumerate(zip(axes, (0, -1), strict=True)):
        drawn: list[float] = []
        for index, (name, layers) in enumerate(layered.items()):
            histories = curves[name]
            samples = [[h.values[prefix + layer][row] for layer in layers] for h in histories]
            epochs = sorted({int(h.values["epoch"][row]) + 1 for h in histories})
            shown = "/".join(str(e) for e in epochs)
            label = name if panel == 0 else f"{name} (epoch {shown})"
            x = list(range(1, len(layers) + 1))
            drawn += _mean_with_band(axis, x, samples, label, index, marker="o")
        if log:
            _log_if_wide(axis, drawn)
        if shared is not None:
            axis.set_xticks(range(1, len(shared) + 1), shared, rotation=45, ha="right")
        axis.set_xlabel("layer (input → output)")
        axis.set_title("first epoch" if panel == 0 else "last epoch")
        axis.grid(True, which="major")
    axes[0].set_ylabel(ylabel)
    _legend_outside(axes[1])
    return fig


def grad_norm_figure(curves: Mapping[str, Sequence[History]]) -> Figure:
    """Per-layer gradient norm in the first and the last epoch, one line per experiment:
    the mean over its replicas with their min–max band (only experiments whose history
    has grad_norm columns; the last epoch is each replica's own)."""
    return _per_layer_figure(curves, GRAD_PREFIX, "mean gradient norm of the weights", log=True)


def zero_fraction_figure(curves: Mapping[str, Sequence[History]]) -> Figure:
    """Per-ReLU-layer fraction of exactly-zero outputs (the lecture's sparsity: "most
    nodes will output zero") in the first and the last epoch, like ``grad_norm_figure``:
    the mean over the replicas with their min–max band, experiments with ReLUs only."""
    figure = _per_layer_figure(curves, ZERO_PREFIX, "fraction of zero ReLU outputs", log=False)
    figure.axes[0].set_ylim(0.0, 1.0)
    return figure


def report_figures(
    curves: Mapping[str, Sequence[History]], deep: Collection[str]
) -> dict[str, Callable[[], Figure]]:
    """The report's figures by key (val_loss, lr, zero_fraction, grad_norms,
    deep_grad_norms), as builders for ``png_bytes``; a gradient-norm (zero-fraction) plot
    only when its experiments recorded grad norms (ReLU zero fractions).

    ``curves`` holds each experiment's replica histories (member 0 of each, replica 0
    first); the learning rate is replica 0's (a plateau's drops differ by seed). The
    ``deep`` experiments (the resnets) get their own gradient-norm plot: beside the MLPs'
    11 layers their 20 would leave the x axis a bare depth index.
    """
    first = {name: histories[0] for name, histories in curves.items()}
    figures: dict[str, Callable[[], Figure]] = {
        "val_loss": lambda: val_loss_figure(curves),
        "lr": lambda: lr_figure(first),
    }
    # the MLPs' ReLUs (the resnets' 19 would crowd them; their table covers them)
    shallow = {n: h for n, h in curves.items() if n not in deep}
    if any(_layers(histories[0], ZERO_PREFIX) for histories in shallow.values()):
        figures["zero_fraction"] = functools.partial(zero_fraction_figure, shallow)
    by_depth = {
        "grad_norms": {n: h for n, h in curves.items() if n not in deep},
        "deep_grad_norms": {n: h for n, h in curves.items() if n in deep},
    }
    for key, group in by_depth.items():
        if any(layer_order(histories[0]) for histories in group.values()):
            figures[key] = functools.partial(grad_norm_figure, group)
    return figures
