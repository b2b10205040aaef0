"""Matplotlib figures (Agg backend: no display needed), shared by train, evaluate, report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["plot_history", "plt"]


def plot_history(history: Sequence[dict[str, float]], title: str = "") -> Figure:
    """Loss, accuracy and learning rate against epoch, like the lecture's plot_history."""
    epochs = [int(record["epoch"]) + 1 for record in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.6))
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
