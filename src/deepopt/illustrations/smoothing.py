"""'SGD smooths the loss function': a 1-D loss with a local minimum, and the same loss
convolved with the density of the step's gradient noise, E[L(w + eta sigma xi)], xi ~
N(0, 1): a larger learning rate eta means wider noise, and the local minimum melts away."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "GRADIENT_NOISE",
    "SMOOTHING_LRS",
    "bumpy_loss",
    "local_minima",
    "smoothed_loss",
    "smoothing_figure",
]

# The loss: a wide bowl with its global minimum at 0, and a narrow dip at 3 that makes a
# local minimum (its slope, up to 2 / e^(1/2) ~ 2.0, beats the bowl's 0.75 there).
_BOWL = 1.0 / 8.0
_DIP_DEPTH, _DIP_AT, _DIP_WIDTH = 1.0, 3.0, 0.3
GRADIENT_NOISE = 1.0  # sigma: std of the gradient noise, so the step's is eta sigma
SMOOTHING_LRS = (0.0, 0.15, 0.3, 0.6)  # eta, from plain GD to the local minimum gone
_NODES = 80  # Gauss-Hermite nodes: exact for polynomials up to degree 159


def bumpy_loss(w: np.ndarray) -> np.ndarray:
    dip = np.exp(-((w - _DIP_AT) ** 2) / (2.0 * _DIP_WIDTH**2))
    return _BOWL * w**2 - _DIP_DEPTH * dip


def smoothed_loss(w: np.ndarray, width: float) -> np.ndarray:
    """The loss convolved with N(0, width^2): E[L(w + width xi)] (pure).

    By Gauss-Hermite quadrature (weight exp(-xi^2 / 2)); ``width`` 0 is the loss itself.
    """
    if width == 0.0:
        return bumpy_loss(w)
    nodes, weights = np.polynomial.hermite_e.hermegauss(_NODES)
    weights = weights / weights.sum()  # a probability: sum(weights) = sqrt(2 pi)
    shifted = w[..., None] + width * nodes  # [..., nodes]
    return np.asarray((bumpy_loss(shifted) * weights).sum(axis=-1))


def local_minima(w: np.ndarray, values: np.ndarray) -> list[float]:
    """The grid points where ``values`` are lower than both neighbours (pure)."""
    inner = (values[1:-1] < values[:-2]) & (values[1:-1] < values[2:])
    return [float(x) for x in w[1:-1][inner]]


def smoothing_figure() -> Figure:
    """The loss and its smoothed versions for the learning rates of ``SMOOTHING_LRS``, each
    minimum marked: two for small eta, one once the noise is wide enough."""
    w = np.linspace(-3.0, 6.0, 1801)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    axis = fig.add_subplot()
    for lr in SMOOTHING_LRS:
        width = lr * GRADIENT_NOISE
        values = smoothed_loss(w, width)
        label = "loss" if lr == 0.0 else f"η = {lr:g} (noise std {width:g})"
        (line,) = axis.plot(w, values, label=label)
        minima = local_minima(w, values)
        axis.plot(minima, np.interp(minima, w, values), "o", color=line.get_color())
    axis.set_xlabel("w")
    axis.set_ylabel("loss")
    axis.set_title("SGD smooths the loss: L convolved with the gradient-noise density")
    axis.grid(True)
    axis.legend()
    return fig
