"""The report's fraction-of-zero-ReLU-outputs figure: drawn for the experiments that
recorded zero fractions (not the resnets), the mean over replicas with its band."""

from __future__ import annotations

import pytest

from deepopt.figures import png_bytes
from deepopt.reporting import History, report_figures, zero_fraction_figure

LAYERS = ("act1", "act2", "act10")  # forward order, which a string sort would change


def _history(zeros: list[float], epochs: int = 2, prefix: str = "zero_fraction/") -> History:
    columns = ("epoch", "val_loss", "lr", *(prefix + layer for layer in LAYERS))
    values = {"epoch": [float(e) for e in range(epochs)], "val_loss": [1.0] * epochs}
    values["lr"] = [0.1] * epochs
    for layer, zero in zip(LAYERS, zeros, strict=True):
        values[prefix + layer] = [zero] * epochs
    return History(columns=columns, values=values)


def test_the_figure_is_drawn_only_for_experiments_with_zero_fractions() -> None:
    relu = [_history([0.4, 0.5, 0.6]), _history([0.5, 0.6, 0.7])]
    sigmoid = [_history([1.0, 1.0, 1.0], prefix="grad_norm/")]
    deep = [_history([0.3, 0.3, 0.3])]
    figures = report_figures({"relu": relu, "sigmoid": sigmoid, "resnet": deep}, deep={"resnet"})
    assert "zero_fraction" in figures
    axis = figures["zero_fraction"]().axes[0]
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == ["relu"]  # no sigmoid (no ReLU), no resnet (its own table)
    means = list(axis.get_lines()[0].get_ydata())
    assert means == pytest.approx([0.45, 0.55, 0.65], abs=1e-12)  # the replicas' mean
    assert len(axis.collections) == 1  # the min-max band of the two replicas
    assert axis.get_ylim() == (0.0, 1.0)


def test_without_zero_fractions_there_is_no_figure() -> None:
    figures = report_figures({"a": [_history([1.0, 1.0, 1.0], prefix="grad_norm/")]}, deep=set())
    assert "zero_fraction" not in figures


def test_the_same_histories_give_the_same_png() -> None:
    curves = {"relu": [_history([0.4, 0.5, 0.6]), _history([0.5, 0.6, 0.7])]}
    assert png_bytes(lambda: zero_fraction_figure(curves)) == png_bytes(
        lambda: zero_fraction_figure(curves)
    )
