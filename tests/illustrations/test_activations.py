"""The lecture's activations: the closed-form derivatives the figure draws match autograd
through the very modules the networks train with."""

from __future__ import annotations

import torch

from deepopt.illustrations.activations import ACTIVATION_DERIVATIVES, activation_curves
from deepopt.models.lecture import new_activation


def test_each_closed_form_derivative_matches_autograd_of_the_training_module() -> None:
    # away from ReLU's kink, where autograd's choice (0) is a convention
    z = torch.linspace(-6.0, 6.0, 1200, dtype=torch.float64).requires_grad_()
    for name, derivative in ACTIVATION_DERIVATIVES.items():
        (slope,) = torch.autograd.grad(new_activation(name)(z).sum(), z)
        torch.testing.assert_close(derivative(z.detach()), slope, rtol=0, atol=1e-12)


def test_relu_derivative_at_zero_is_torchs_zero() -> None:
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(torch.relu(z).sum(), z)
    assert float(ACTIVATION_DERIVATIVES["relu"](z.detach())) == float(slope) == 0.0


def test_curves_hold_the_lecture_values() -> None:
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    curves = activation_curves(z)
    assert list(curves) == ["relu", "sigmoid", "tanh"]
    assert curves["relu"][0].tolist() == [0.0, 0.0, 3.0]
    assert curves["relu"][1].tolist() == [0.0, 0.0, 1.0]  # "either 0 or 1"
    assert float(curves["sigmoid"][1].max()) == 0.25  # the sigmoid's slope peaks at 1/4
    assert float(curves["tanh"][1][1]) == 1.0
