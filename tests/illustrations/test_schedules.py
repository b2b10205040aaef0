"""The learning-rate curves are the lecture's own (its In [14] and In [28] written out
here) and the rates training's schedules step through."""

from __future__ import annotations

import numpy as np
import torch

from deepopt.config import SCHEDULE_KNOBS, OptimConfig, ScheduleConfig
from deepopt.illustrations.schedules import (
    LECTURE_BATCHES_PER_EPOCH,
    LECTURE_PLOT_DECAY,
    decay_curve,
    linear_curve,
)
from deepopt.optim import build_optimizer, build_schedule


def test_decay_curve_is_the_lecture_plot() -> None:
    its = np.arange(0, 50 * 5400 / 50)  # 50 epochs, 5400/50 iterations per epoch
    lr = 0.02 * (1.0 / (1 + its * 1e-3))
    batches, rates = decay_curve(LECTURE_PLOT_DECAY)
    assert LECTURE_BATCHES_PER_EPOCH == 108
    np.testing.assert_array_equal(batches, its)
    np.testing.assert_allclose(rates, lr, rtol=1e-15, atol=0)


def test_the_code_decay_is_the_one_training_defaults_to() -> None:
    assert SCHEDULE_KNOBS["inverse_time"]["decay"] == 1e-5  # the lecture's decay=1e-5
    _, rates = decay_curve(1e-5)
    assert rates[-1] == 0.02 / (1 + 5399 * 1e-5)


def test_linear_curve_is_the_lectures_sc() -> None:
    def sc(epoch: np.ndarray) -> np.ndarray:
        alpha = np.minimum(epoch / 50, 1.0)
        return 0.02 * (1 - alpha) + 0.0001 * alpha

    epoch, rates = linear_curve()
    np.testing.assert_array_equal(epoch, np.arange(0, 70))
    np.testing.assert_allclose(rates, sc(epoch), rtol=1e-12, atol=0)
    assert rates[50:].tolist() == [rates[50]] * 20  # held after the horizon


def _stepped(schedule: ScheduleConfig, steps: int, per_batch: bool) -> list[float]:
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = build_optimizer([weight], OptimConfig(name="nesterov", lr=0.02))
    run = build_schedule(optimizer, schedule, epochs=50, steps_per_epoch=108)
    rates = []
    for _ in range(steps):
        rates.append(run.current_lr())
        optimizer.step()
        if per_batch:
            run.after_batch()
        else:
            run.after_epoch({})
    return rates


def test_curves_are_what_the_training_schedules_step_through() -> None:
    decay = ScheduleConfig(name="inverse_time", decay=LECTURE_PLOT_DECAY)
    _, rates = decay_curve(LECTURE_PLOT_DECAY)
    np.testing.assert_allclose(_stepped(decay, 500, per_batch=True), rates[:500], rtol=1e-12)
    linear = ScheduleConfig(name="linear", final_lr=1e-4, horizon=50)
    _, rates = linear_curve()
    np.testing.assert_allclose(_stepped(linear, 70, per_batch=False), rates, rtol=1e-12)
