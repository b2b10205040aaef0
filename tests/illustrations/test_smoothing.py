"""'SGD smooths the loss': the convolution is right, and the local minimum is there without
noise and gone at the largest learning rate."""

from __future__ import annotations

import numpy as np

from deepopt.illustrations.smoothing import (
    GRADIENT_NOISE,
    SMOOTHING_LRS,
    bumpy_loss,
    local_minima,
    smoothed_loss,
)

W = np.linspace(-3.0, 6.0, 1801)


def test_smoothing_is_the_gaussian_convolution_in_closed_form() -> None:
    # bowl w^2/8 -> (w^2 + s^2)/8; dip -e^(-(w-3)^2/(2 .09)) -> Gaussians' widths add
    width = 0.4
    spread = 0.3**2 + width**2
    dip = 0.3 / np.sqrt(spread) * np.exp(-((W - 3.0) ** 2) / (2 * spread))
    closed = (W**2 + width**2) / 8 - dip
    np.testing.assert_allclose(smoothed_loss(W, width), closed, rtol=0, atol=1e-10)


def test_without_noise_the_loss_has_a_local_minimum_beside_the_global_one() -> None:
    minima = local_minima(W, smoothed_loss(W, 0.0))
    assert len(minima) == 2
    assert abs(minima[0]) < 0.01  # the global minimum at 0
    assert bumpy_loss(np.array(minima[1])) > bumpy_loss(np.array(minima[0]))


def test_the_local_minimum_vanishes_as_the_learning_rate_grows() -> None:
    counts = [len(local_minima(W, smoothed_loss(W, lr * GRADIENT_NOISE))) for lr in SMOOTHING_LRS]
    assert counts[0] == 2 and counts[-1] == 1
    assert counts == sorted(counts, reverse=True)  # once gone, it stays gone
