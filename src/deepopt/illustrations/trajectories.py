"""Optimizer paths on two-parameter losses, driven by the optimizers training uses
(``deepopt.optim.build_optimizer`` with an ``OptimConfig``, Keras' default knobs filled in):
an ill-conditioned quadratic (condition number 100) and Rosenbrock's valley, with and
without gradient noise, and the convergence rate measured along a path."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepopt.config import OptimConfig
from deepopt.optim import build_optimizer

__all__ = [
    "PATH_OPTIMIZERS",
    "Problem",
    "Quadratic",
    "convergence_rate",
    "heavy_ball_optimum",
    "optimizer_path",
    "quadratic",
    "rosenbrock",
]

# The lecture's optimizers, in its order; each path takes training's builder and knobs.
PATH_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")

Loss = Callable[[torch.Tensor], torch.Tensor]  # [..., 2] -> [...] (float64)


@dataclass(frozen=True)
class Problem:
    """A loss of two parameters, where its paths start, its minimum, and the view drawn."""

    name: str
    loss: Loss
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]


@dataclass(frozen=True)
class Quadratic:
    """f(x) = 1/2 x^T H x, H = R diag(lambda_min, lambda_max) R^T with R a rotation by
    ``angle`` (so no optimizer's per-coordinate scaling lines up with the axes of the
    valley); the minimum is 0."""

    lambda_min: float = 1.0
    lambda_max: float = 100.0
    angle: float = math.pi / 6

    @property
    def kappa(self) -> float:
        return self.lambda_max / self.lambda_min

    def hessian(self) -> torch.Tensor:  # [2, 2]
        c, s = math.cos(self.angle), math.sin(self.angle)
        rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        scales = torch.diag(torch.tensor([self.lambda_min, self.lambda_max], dtype=torch.float64))
        return rotation @ scales @ rotation.T

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ self.hessian()) * x).sum(dim=-1)  # [..., 2] -> [...]

    def gd_optimum(self) -> tuple[float, float]:
        """Gradient descent's best fixed step 2 / (lambda_min + lambda_max) and its rate
        (kappa - 1) / (kappa + 1) (Goh 2017, 'Why Momentum Really Works', Distill)."""
        step = 2.0 / (self.lambda_min + self.lambda_max)
        return step, (self.kappa - 1.0) / (self.kappa + 1.0)


def heavy_ball_optimum(problem: Quadratic) -> tuple[float, float, float]:
    """Heavy-ball momentum's best step alpha = (2 / (sqrt(l_min) + sqrt(l_max)))^2 and
    momentum beta = ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2, and its rate sqrt(beta) =
    (sqrt(kappa) - 1) / (sqrt(kappa) + 1) (Goh 2017).

    torch's SGD keeps b = beta b + g and steps p -= lr b, so p_{k+1} - p_k =
    beta (p_k - p_{k-1}) - lr g_k: heavy ball with step alpha = lr and the same beta (its
    first step, b = g, is heavy ball from rest). So lr = alpha, momentum = beta.
    """
    root = math.sqrt(problem.kappa)
    alpha = (2.0 / (math.sqrt(problem.lambda_min) + math.sqrt(problem.lambda_max))) ** 2
    rate = (root - 1.0) / (root + 1.0)
    return alpha, rate**2, rate


def quadratic(problem: Quadratic | None = None) -> Problem:
    shape = problem or Quadratic()
    return Problem(
        name=f"quadratic, condition number {shape.kappa:g}",
        loss=shape.loss,
        # mostly along the shallow axis, a little up the steep walls: GD zigzags across
        start=(-2.3, -1.0),
        minimum=(0.0, 0.0),
        xlim=(-2.6, 1.0),
        ylim=(-1.5, 0.8),
    )


def _rosenbrock_loss(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]  # [...] each
    return (1.0 - u) ** 2 + 100.0 * (v - u**2) ** 2


def rosenbrock() -> Problem:
    """(1 - x)^2 + 100 (y - x^2)^2: a curved valley, minimum at (1, 1)."""
    return Problem(
        name="Rosenbrock",
        loss=_rosenbrock_loss,
        start=(-1.2, 1.0),
        minimum=(1.0, 1.0),
        xlim=(-2.0, 2.0),
        ylim=(-1.0, 3.0),
    )


def optimizer_path(
    loss: Loss,
    start: Sequence[float],
    cfg: OptimConfig,
    steps: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """The points [steps + 1, 2] the optimizer of ``cfg`` visits from ``start``.

    ``noise`` > 0 adds N(0, noise^2 I) to every gradient (a seeded generator: the same
    seed, the same path), standing in for minibatch noise. In float64: the quadratic's
    error falls by 1e-80 over a long path, which float32 would lose.
    """
    point = torch.nn.Parameter(torch.tensor(list(start), dtype=torch.float64))
    optimizer = build_optimizer([point], cfg)
    generator = torch.Generator().manual_seed(seed)
    visited = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        loss(point).backward()  # type: ignore[no-untyped-call]
        if noise > 0.0:
            assert point.grad is not None  # set by backward
            point.grad.add_(noise * torch.randn(2, generator=generator, dtype=torch.float64))
        optimizer.step()
        visited.append(point.detach().clone())
    return torch.stack(visited)  # [steps + 1, 2]


def convergence_rate(path: torch.Tensor, minimum: Sequence[float], first: int, last: int) -> float:
    """The measured rate: the geometric mean of the per-step error ratio e_{k+1} / e_k
    over steps ``first`` .. ``last``, which telescopes to (e_last / e_first)^(1/(last -
    first)), e_k = |x_k - x*|.

    A single ratio says little: with momentum the error spirals (complex eigenvalues), so
    it shrinks unevenly from step to step, and early on the slower modes have not yet taken
    over. Over a window after that transient the mean is the spectral radius; at heavy
    ball's optimum the double eigenvalue adds a factor k, a bias of ln(last/first) /
    (last - first) on the log rate (0.14 % for steps 500 .. 1000).
    """
    errors = torch.linalg.vector_norm(path - torch.tensor(list(minimum)), dim=1)  # [steps + 1]
    ratio = float(errors[last] / errors[first])
    return math.exp(math.log(ratio) / (last - first))
