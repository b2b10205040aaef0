"""Every figure of ``LECTURE_FIGURES`` as a builder for ``deepopt.figures.png_bytes``: the
drawn ones (pure, from formulas and the optimizers) and the measured ones, read from the
vanishing_* experiments' ``plots/<name>/runs.csv`` (every seed's history)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from deepopt import paths
from deepopt.errors import DataError, one_line
from deepopt.illustrations.activations import activation_figure
from deepopt.illustrations.path_figures import path_figure, rates_figure
from deepopt.illustrations.schedules import decay_figure, linear_figure
from deepopt.illustrations.smoothing import smoothing_figure
from deepopt.reporting import (
    GRAD_PREFIX,
    ZERO_PREFIX,
    History,
    grad_norm_figure,
    parse_runs,
    zero_fraction_figure,
)

__all__ = ["drawn_figures", "measured_curves", "measured_figures"]

Builder = Callable[[], Figure]


def drawn_figures() -> dict[str, Builder]:
    """The figures drawn from formulas and the optimizers, by LECTURE_FIGURES key."""
    return {
        "activations": activation_figure,
        "lr_decay": decay_figure,
        "lr_linear": linear_figure,
        "paths_quadratic": functools.partial(path_figure, "quadratic"),
        "paths_rosenbrock": functools.partial(path_figure, "rosenbrock"),
        "quadratic_rates": rates_figure,
        "sgd_smoothing": smoothing_figure,
    }


def measured_curves(names: Sequence[str], root: Path = Path(".")) -> dict[str, list[History]]:
    """Each experiment's seeds' histories (member 0 of each replica, replica order) from
    its runs.csv, for the experiments of ``names`` whose runs.csv exists (not trained yet:
    left out); a damaged file is a DataError naming it."""
    curves = {}
    for name in names:
        source = root / paths.runs_history_path(name)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(
                f"{source}: cannot be read ({one_line(err)}); run `dvc repro`"
            ) from None
        first: dict[int, History] = {}
        for run in sorted(parse_runs(text, str(source)), key=lambda r: (r.replica, r.member)):
            first.setdefault(run.replica, run.history)
        curves[name] = [first[replica] for replica in sorted(first)]
    return curves


def _recorded(curves: dict[str, list[History]], prefix: str) -> dict[str, list[History]]:
    return {n: h for n, h in curves.items() if any(c.startswith(prefix) for c in h[0].columns)}


def measured_figures(curves: dict[str, list[History]]) -> dict[str, Builder]:
    """The measured figures whose columns some experiment of ``curves`` recorded (a
    sigmoid MLP has no ReLU, so no zero fractions), by LECTURE_FIGURES key."""
    figures: dict[str, Builder] = {}
    with_zeros = _recorded(curves, ZERO_PREFIX)
    if with_zeros:
        figures["zero_fraction"] = functools.partial(zero_fraction_figure, with_zeros)
    with_grads = _recorded(curves, GRAD_PREFIX)
    if with_grads:
        figures["vanishing_gradient"] = functools.partial(grad_norm_figure, with_grads)
    return figures
