"""The optimizer-path figures: the lecture's six optimizers on the ill-conditioned quadratic
and on Rosenbrock, without and with gradient noise, and the quadratic's measured
convergence beside the theory's rates (``trajectories`` computes every point)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepopt.config import OptimConfig
from deepopt.illustrations.trajectories import (
    PATH_OPTIMIZERS,
    Problem,
    Quadratic,
    convergence_rate,
    heavy_ball_optimum,
    optimizer_path,
    quadratic,
    rosenbrock,
)

__all__ = [
    "PATH_SETTINGS",
    "RATE_WINDOW",
    "PathSetting",
    "path_figure",
    "quadratic_rates",
    "rates_figure",
]


@dataclass(frozen=True)
class PathSetting:
    """How one problem's paths run: each optimizer's learning rate (its other knobs are
    Keras' defaults, as in training), the steps, and the std of the added gradient noise."""

    lrs: dict[str, float]
    steps: int
    noise: float


# Learning rates picked so every path gets somewhere in the steps shown; SGD's on the
# quadratic is its best fixed step 2 / (1 + 100).
PATH_SETTINGS: dict[str, PathSetting] = {
    "quadratic": PathSetting(
        lrs={
            "sgd": 2.0 / 101.0,
            "momentum": 0.003,
            "nesterov": 0.003,
            "adagrad": 0.25,
            "rmsprop": 0.05,
            "adam": 0.1,
        },
        steps=100,
        noise=2.0,
    ),
    "rosenbrock": PathSetting(
        lrs={
            "sgd": 1e-3,
            "momentum": 3e-4,
            "nesterov": 3e-4,
            "adagrad": 0.5,
            "rmsprop": 0.01,
            "adam": 0.05,
        },
        steps=1000,
        noise=5.0,
    ),
}
_PROBLEMS = {"quadratic": quadratic, "rosenbrock": rosenbrock}
RATE_WINDOW = (500, 1000)  # steps over which quadratic_rates measures (after the transient)
_NOISE_SEED = 0


def _contours(axis: Axes, problem: Problem) -> None:
    xs = torch.linspace(*problem.xlim, 201, dtype=torch.float64)
    ys = torch.linspace(*problem.ylim, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [201, 201, 2]
    values = problem.loss(grid)  # [201, 201]
    levels = np.geomspace(1e-3, float(values.max()), 18)
    axis.contour(
        xs.numpy(), ys.numpy(), values.numpy(), levels=levels, colors="0.75", linewidths=0.6
    )


def path_figure(key: str) -> Figure:
    """The six optimizers' paths on problem ``key`` ("quadratic", "rosenbrock"): left
    exact gradients, right with N(0, noise^2 I) added to each (seeded)."""
    problem, setting = _PROBLEMS[key](), PATH_SETTINGS[key]
    # equal axes: each panel ~4.6 in wide, as tall as the view's shape asks, plus titles
    shape = (problem.ylim[1] - problem.ylim[0]) / (problem.xlim[1] - problem.xlim[0])
    fig = Figure(figsize=(12.0, 1.3 + 4.6 * shape), layout="constrained")
    panels = fig.subplots(1, 2, sharex=True, sharey=True)
    colors = [colormaps["tab10"](i) for i in range(len(PATH_OPTIMIZERS))]
    for axis, noise in zip(panels, (0.0, setting.noise), strict=True):
        _contours(axis, problem)
        for name, color in zip(PATH_OPTIMIZERS, colors, strict=True):
            cfg = OptimConfig(name=name, lr=setting.lrs[name])
            path = optimizer_path(
                problem.loss, problem.start, cfg, setting.steps, noise=noise, seed=_NOISE_SEED
            ).numpy()
            axis.plot(
                path[:, 0],
                path[:, 1],
                color=color,
                linewidth=1.0,
                label=f"{name} (lr {setting.lrs[name]:.3g})",
            )
        axis.plot(*problem.start, "ko", markersize=4)
        axis.plot(*problem.minimum, "k*", markersize=10)
        axis.set_aspect("equal")
        axis.set_xlim(*problem.xlim)
        axis.set_ylim(*problem.ylim)
        axis.set_xlabel("w1")
        axis.set_title("exact gradient" if noise == 0.0 else f"gradient + N(0, {noise:g}²) noise")
    panels[0].set_ylabel("w2")
    panels[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.suptitle(f"{problem.name}: {setting.steps} steps from ●, minimum ★")
    return fig


def quadratic_rates(shape: Quadratic | None = None) -> dict[str, dict[str, float]]:
    """Measured and theoretical rates on the quadratic (pure): gradient descent at its best
    step, and heavy-ball momentum (torch's SGD momentum) at its best step and momentum."""
    shape = shape or Quadratic()
    problem = quadratic(shape)
    gd_step, gd_rate = shape.gd_optimum()
    alpha, beta, hb_rate = heavy_ball_optimum(shape)
    runs = {
        "gradient descent": (OptimConfig(name="sgd", lr=gd_step), gd_rate),
        "heavy ball": (OptimConfig(name="momentum", lr=alpha, momentum=beta), hb_rate),
    }
    rates = {}
    for label, (cfg, theory) in runs.items():
        path = optimizer_path(problem.loss, problem.start, cfg, RATE_WINDOW[1])
        measured = convergence_rate(path, problem.minimum, *RATE_WINDOW)
        rates[label] = {
            "lr": cfg.lr,
            "momentum": cfg.momentum or 0.0,
            "measured": measured,
            "theory": theory,
        }
    return rates


def rates_figure() -> Figure:
    """Distance to the minimum against step on the quadratic, gradient descent and heavy
    ball at their best settings, with the theory's rate rho^k dashed beside each."""
    shape = Quadratic()
    problem = quadratic(shape)
    rates = quadratic_rates(shape)
    steps = 200
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    axis = fig.add_subplot()
    for index, (label, rate) in enumerate(rates.items()):
        cfg = OptimConfig(
            name="sgd" if rate["momentum"] == 0.0 else "momentum",
            lr=rate["lr"],
            momentum=rate["momentum"] or None,
        )
        path = optimizer_path(problem.loss, problem.start, cfg, steps)
        errors = torch.linalg.vector_norm(path, dim=1).numpy()
        color = colormaps["tab10"](index)
        axis.semilogy(errors, color=color, label=f"{label}: measured rate {rate['measured']:.4f}")
        k = np.arange(steps + 1)
        axis.semilogy(
            k,
            errors[0] * rate["theory"] ** k,
            "--",
            color=color,
            label=f"theory {rate['theory']:.4f}",
        )
    axis.set_xlabel("step")
    axis.set_ylabel("distance to the minimum")
    axis.set_title(f"Quadratic, κ = {shape.kappa:g}: (κ−1)/(κ+1) vs (√κ−1)/(√κ+1)")
    axis.grid(True, which="major")
    axis.legend(fontsize="small")
    return fig
