"""The lecture's activation functions and their derivatives (its ``actfig``): ReLU,
sigmoid and tanh as the modules the networks train with (``deepopt.models``), each
derivative in closed form beside it (tests/illustrations check them against autograd)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from matplotlib.figure import Figure

from deepopt.models.lecture import new_activation

__all__ = ["ACTIVATION_DERIVATIVES", "activation_curves", "activation_figure"]


def _relu_derivative(z: torch.Tensor) -> torch.Tensor:
    # 0 or 1: "the gradient is either 0 or 1"; at z = 0 torch's ReLU backward gives 0.
    return (z > 0).to(z.dtype)


def _sigmoid_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)  # at most 1/4: ten sigmoid layers shrink a gradient by 4^10


def _tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.tanh(z) ** 2


# model.activation's names, in the lecture's order.
ACTIVATION_DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": _relu_derivative,
    "sigmoid": _sigmoid_derivative,
    "tanh": _tanh_derivative,
}


def activation_curves(z: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each activation's values and derivative at ``z`` (any shape), by name (pure)."""
    curves = {}
    with torch.no_grad():
        for name, derivative in ACTIVATION_DERIVATIVES.items():
            curves[name] = (new_activation(name)(z), derivative(z))
    return curves


def activation_figure() -> Figure:
    """Left the functions, right their derivatives, over z in [-6, 6] (the lecture's
    actfig: ReLU beside the saturating sigmoid and tanh)."""
    z = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)  # includes z = 0
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    ax_value, ax_slope = fig.subplots(1, 2)
    for name, (value, slope) in activation_curves(z).items():
        ax_value.plot(z.numpy(), value.numpy(), label=name)
        ax_slope.plot(z.numpy(), slope.numpy(), label=name)
    ax_value.set_ylim(-1.5, 3.0)
    ax_value.set_title("activation h(z)")
    ax_slope.set_title("derivative dh/dz")
    for axis in (ax_value, ax_slope):
        axis.set_xlabel("z")
        axis.grid(True)
        axis.legend(loc="upper left")
    return fig
