"""THE one PNG renderer (``png_bytes``: a pinned matplotlib style, so the same data give the
same bytes whatever the user's matplotlibrc) and the per-run history figure train logs."""

# Figures are ``Figure`` objects, never pyplot's (no global registry, nothing to close).

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import matplotlib
from matplotlib.figure import Figure

__all__ = ["pinned_style", "plot_history", "plot_lr_find", "png_bytes", "pyplot"]


def pinned_style() -> matplotlib.RcParams:
    """matplotlib's own defaults (``rcParamsDefault``, from the matplotlibrc matplotlib
    ships, which no user file or ``MATPLOTLIBRC`` changes). The backend is left out: it is no
    style, ``rc_context`` does not restore it, and a PNG is drawn by Agg whatever it is."""
    defaults = matplotlib.rcParamsDefault
    return matplotlib.RcParams({key: defaults[key] for key in defaults if key != "backend"})


def png_bytes(figure: Figure | Callable[[], Figure]) -> bytes:
    """A figure as PNG bytes that depend only on the data.

    Pass a builder (``lambda: val_loss_figure(histories)``): it runs inside the pinned style
    (``pinned_style``), so neither the user's matplotlibrc nor rcParams changed in-process
    reach the pixels. A ``Figure`` built beforehand keeps the style it was built with; only
    its drawing is pinned. PNG output is always rendered by Agg; no Software metadata (it
    names the matplotlib version), and PNGs carry no timestamp unless asked to.
    """
    with matplotlib.rc_context(pinned_style()):
        built = figure if isinstance(figure, Figure) else figure()
        buffer = io.BytesIO()
        built.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed), for the code that must draw
    through pyplot (Optuna's matplotlib views); deepopt's own figures never need it."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Sequence[dict[str, float]], title: str = "") -> Figure:
    """Loss, accuracy and learning rate against epoch, like the lecture's plot_history."""
    epochs = [int(record["epoch"]) + 1 for record in history]
    fig = Figure(figsize=(13, 3.6))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    panels: list[tuple[Any, str, str]] = [(ax_loss, "loss", "val_loss"), (ax_acc, "acc", "val_acc")]
    for axis, train_key, val_key in panels:
        axis.plot(epochs, [r[train_key] for r in history], label="train")
        axis.plot(epochs, [r[val_key] for r in history], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(train_key)
        axis.grid(True)
        axis.legend()
    ax_lr.plot(epochs, [r["lr"] for r in history])
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (epoch start)")
    ax_lr.grid(True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    suggestion_step: int | None,
    lr_used: float,
    title: str = "",
    skip_end: int = 5,
) -> Figure:
    """The range test's smoothed loss against the learning rate (log scale), as fastai's
    ``plot_lr_find`` draws it (without the last ``skip_end`` points, where the loss
    explodes), with the suggested rate marked and the rate the config trains at."""
    shown = max(1, len(lrs) - skip_end)
    fig = Figure(figsize=(6.4, 4.2))
    axis = fig.subplots()
    axis.plot(lrs[:shown], losses[:shown])
    if suggestion_step is not None:
        step = suggestion_step
        axis.plot([lrs[step]], [losses[step]], "o", color="C1", label=f"valley: {lrs[step]:.3g}")
    axis.axvline(lr_used, color="C2", linestyle="--", label=f"optim.lr: {lr_used:.3g}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("smoothed training loss")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="best")
    if title:
        axis.set_title(title)
    fig.tight_layout()
    return fig
