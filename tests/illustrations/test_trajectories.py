"""Optimizer paths: driven by training's builder, seeded noise, and on the quadratic
(condition number 100) the measured rates of gradient descent and heavy-ball momentum
within 2 % of theory (Goh 2017, 'Why Momentum Really Works')."""

from __future__ import annotations

import math

import pytest
import torch

from deepopt.config import OptimConfig
from deepopt.illustrations.path_figures import RATE_WINDOW, quadratic_rates
from deepopt.illustrations.trajectories import (
    Quadratic,
    convergence_rate,
    heavy_ball_optimum,
    optimizer_path,
    quadratic,
    rosenbrock,
)

SHAPE = Quadratic()
PROBLEM = quadratic(SHAPE)


@pytest.fixture(scope="module")
def rates() -> dict[str, dict[str, float]]:
    return quadratic_rates(SHAPE)


def test_the_theory_rates_are_goh_s() -> None:
    assert SHAPE.kappa == 100.0
    step, rate = SHAPE.gd_optimum()
    assert step == 2.0 / 101.0 and rate == 99.0 / 101.0
    alpha, beta, hb_rate = heavy_ball_optimum(SHAPE)
    assert alpha == pytest.approx((2.0 / 11.0) ** 2) and beta == pytest.approx((9.0 / 11.0) ** 2)
    assert hb_rate == pytest.approx(9.0 / 11.0)


@pytest.mark.parametrize("method", ["gradient descent", "heavy ball"])
def test_measured_rate_is_within_2_percent_of_theory(
    rates: dict[str, dict[str, float]], method: str
) -> None:
    measured, theory = rates[method]["measured"], rates[method]["theory"]
    assert measured == pytest.approx(theory, rel=0.02)
    # and the steps per e-fold, -1/ln(rate), which tells 0.98 from 0.99 (a wrong step)
    assert -1 / math.log(measured) == pytest.approx(-1 / math.log(theory), rel=0.02)


def test_heavy_ball_is_torchs_momentum_with_lr_alpha_and_momentum_beta() -> None:
    alpha, beta, _ = heavy_ball_optimum(SHAPE)
    cfg = OptimConfig(name="momentum", lr=alpha, momentum=beta)
    path = optimizer_path(PROBLEM.loss, PROBLEM.start, cfg, 50)
    hessian = SHAPE.hessian()
    previous = current = torch.tensor(PROBLEM.start, dtype=torch.float64)
    for k in range(50):  # x_{k+1} = x_k - alpha grad f(x_k) + beta (x_k - x_{k-1})
        previous, current = (
            current,
            current - alpha * hessian @ current + beta * (current - previous),
        )
        torch.testing.assert_close(path[k + 1], current, rtol=1e-12, atol=1e-14)


def test_keras_default_momentum_is_slower_than_the_optimum() -> None:
    # the check can fail: momentum 0.9 (the lecture's) at the same step is off the optimum
    alpha, _, hb_rate = heavy_ball_optimum(SHAPE)
    cfg = OptimConfig(name="momentum", lr=alpha)
    path = optimizer_path(PROBLEM.loss, PROBLEM.start, cfg, RATE_WINDOW[1])
    measured = convergence_rate(path, PROBLEM.minimum, *RATE_WINDOW)
    assert measured == pytest.approx(math.sqrt(0.9), rel=0.01)  # underdamped: sqrt(beta)
    assert measured > hb_rate * 1.1


def test_gradient_noise_is_seeded() -> None:
    problem = rosenbrock()
    cfg = OptimConfig(name="adam", lr=0.05)
    first = optimizer_path(problem.loss, problem.start, cfg, 30, noise=5.0, seed=3)
    again = optimizer_path(problem.loss, problem.start, cfg, 30, noise=5.0, seed=3)
    other = optimizer_path(problem.loss, problem.start, cfg, 30, noise=5.0, seed=4)
    exact = optimizer_path(problem.loss, problem.start, cfg, 30)
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, exact)


def test_paths_take_the_configs_keras_knobs() -> None:
    # Adagrad's first step with Keras' initial accumulator 0.1 (torch's default is 0):
    # lr g / sqrt(0.1 + g^2) per coordinate
    cfg = OptimConfig(name="adagrad", lr=0.1)
    start = torch.tensor(PROBLEM.start, dtype=torch.float64)
    gradient = SHAPE.hessian() @ start
    expected = start - 0.1 * gradient / (torch.sqrt(0.1 + gradient**2) + 1e-7)
    path = optimizer_path(PROBLEM.loss, PROBLEM.start, cfg, 1)
    torch.testing.assert_close(path[1], expected, rtol=1e-12, atol=1e-14)
