"""The lecture's learning-rate curves, drawn as it draws them and computed by the schedule
formulas training steps with (``deepopt.optim.inverse_time_factor``, ``linear_factor``).

- Keras' ``decay``: eta_k = eta0 / (1 + delta k) per batch over 50 epochs of 5400 / 50 = 108
  batches. The lecture's plot uses delta = 1e-3 (In [14]), its training code delta = 1e-5
  (In [15], and ``SCHEDULE_KNOBS``): both are drawn, labelled so.
- ``sc``: linear 0.02 -> 0.0001 over 50 epochs, then held, drawn over 70 epochs (In [28]).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from deepopt.config import SCHEDULE_KNOBS, OptimConfig
from deepopt.optim import inverse_time_factor, linear_factor

__all__ = [
    "LECTURE_BATCHES_PER_EPOCH",
    "LECTURE_DECAY_EPOCHS",
    "LECTURE_PLOT_DECAY",
    "LECTURE_SC_EPOCHS",
    "LECTURE_SC_HORIZON",
    "decay_curve",
    "decay_figure",
    "linear_curve",
    "linear_figure",
]

LECTURE_BATCHES_PER_EPOCH = 5400 // 50  # 5,400 training images in batches of 50
LECTURE_DECAY_EPOCHS = 50
LECTURE_PLOT_DECAY = 1e-3  # the delta of the lecture's plot; its code trains with 1e-5
LECTURE_SC_HORIZON = 50  # sc's alpha = min(epoch / 50, 1)
LECTURE_SC_EPOCHS = 70  # the epochs its plot shows
_LR0 = OptimConfig().lr  # 0.02, the lecture's (and the config's default) eta0


def decay_curve(
    decay: float,
    *,
    lr0: float = _LR0,
    epochs: int = LECTURE_DECAY_EPOCHS,
    batches_per_epoch: int = LECTURE_BATCHES_PER_EPOCH,
) -> tuple[np.ndarray, np.ndarray]:
    """(batch index k, learning rate of batch k) for Keras' ``decay`` = delta (pure)."""
    batches = np.arange(epochs * batches_per_epoch)
    rates = np.array([lr0 * inverse_time_factor(int(k), decay=decay) for k in batches])
    return batches, rates


def linear_curve(
    *,
    lr0: float = _LR0,
    final_lr: float = float(SCHEDULE_KNOBS["linear"]["final_lr"]),
    horizon: int = LECTURE_SC_HORIZON,
    epochs: int = LECTURE_SC_EPOCHS,
) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, learning rate of that epoch) for the lecture's ``sc`` (pure)."""
    epoch = np.arange(epochs)
    rates = np.array(
        [lr0 * linear_factor(int(k), lr0=lr0, final_lr=final_lr, horizon=horizon) for k in epoch]
    )
    return epoch, rates


def decay_figure() -> Figure:
    """Keras' per-batch decay over the lecture's 50 epochs: its plot's delta and its code's."""
    code_decay = float(SCHEDULE_KNOBS["inverse_time"]["decay"])  # 1e-5, as training uses
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    axis = fig.add_subplot()
    for decay, source in ((LECTURE_PLOT_DECAY, "the lecture's plot"), (code_decay, "its code")):
        batches, rates = decay_curve(decay)
        axis.plot(batches, rates, label=f"δ = {decay:g} ({source})")
    axis.set_xlabel(f"iteration (batch; {LECTURE_BATCHES_PER_EPOCH} per epoch)")
    axis.set_ylabel("learning rate")
    axis.set_title("Keras decay: η0 / (1 + δ k), k counting batches")
    axis.set_ylim(0.0, _LR0 * 1.05)
    axis.grid(True)
    axis.legend()
    return fig


def linear_figure() -> Figure:
    """The lecture's ``sc``: linear from 0.02 to 0.0001 over 50 epochs, held to epoch 70."""
    epoch, rates = linear_curve()
    fig = Figure(figsize=(6.5, 3.0), layout="constrained")
    axis = fig.add_subplot()
    axis.plot(epoch, rates)
    axis.set_xlabel("epoch")
    axis.set_ylabel("learning rate")
    axis.set_title("sc: (1 − α) η0 + α ηT, α = min(epoch / 50, 1)")
    axis.grid(True)
    return fig
