"""Optimizers and learning-rate schedules against the lecture's formulas, written out here.

A schedule's sequence is read the way a training loop sees it: ``lrs[k][b]`` is the
learning rate in ``optimizer.param_groups`` while batch ``b`` of epoch ``k`` is trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepopt.config import (
    OPTIMIZER_KNOBS,
    OPTIMIZER_NAMES,
    SCHEDULE_KNOBS,
    SCHEDULE_NAMES,
    OptimConfig,
    ScheduleConfig,
)
from deepopt.errors import ConfigError, DeepoptError
from deepopt.optim import COSINE_FLOOR, LRSchedule, build_optimizer, build_schedule

LR0 = 0.02  # the lecture's SGD learning rate


def make_run(
    schedule: ScheduleConfig, *, lr0: float = LR0, epochs: int, steps: int
) -> tuple[nn.Parameter, torch.optim.Optimizer, LRSchedule]:
    weight = nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([weight], OptimConfig(name="nesterov", lr=lr0))
    return (
        weight,
        optimizer,
        build_schedule(optimizer, schedule, epochs=epochs, steps_per_epoch=steps),
    )


def train(
    weight: nn.Parameter,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    *,
    epochs: range,
    steps: int,
    metrics: Sequence[float] | None = None,
    monitor: str = "val_loss",
) -> list[list[float]]:
    """The lr used by each batch of each epoch, stepping the schedule like the trainer."""
    lrs = []
    for epoch in epochs:
        used = []
        for _ in range(steps):
            used.append(optimizer.param_groups[0]["lr"])
            assert schedule.current_lr() == used[-1]
            optimizer.zero_grad()
            (weight**2).sum().backward()
            optimizer.step()
            schedule.after_batch()
        lrs.append(used)
        value = metrics[epoch] if metrics is not None else 1.0
        schedule.after_epoch({monitor: value, "other": -1.0})
    return lrs


def run(
    schedule: ScheduleConfig,
    *,
    lr0: float = LR0,
    epochs: int,
    steps: int,
    metrics: Sequence[float] | None = None,
) -> list[list[float]]:
    weight, optimizer, lr_schedule = make_run(schedule, lr0=lr0, epochs=epochs, steps=steps)
    monitor = schedule.monitor or "val_loss"
    return train(
        weight,
        optimizer,
        lr_schedule,
        epochs=range(epochs),
        steps=steps,
        metrics=metrics,
        monitor=monitor,
    )


def per_epoch(lrs: list[list[float]]) -> list[float]:
    """One lr per epoch, checking that it did not change within the epoch."""
    for used in lrs:
        assert all(lr == used[0] for lr in used)
    return [used[0] for used in lrs]


def keras_plateau(
    metrics: Sequence[float],
    *,
    lr0: float,
    factor: float,
    patience: int,
    min_delta: float,
    cooldown: int,
    min_lr: float,
    mode: str,
) -> list[float]:
    """The lr of each epoch under Keras' ReduceLROnPlateau.on_epoch_end, transcribed."""
    better = (lambda a, b: a < b - min_delta) if mode == "min" else (lambda a, b: a > b + min_delta)
    best = math.inf if mode == "min" else -math.inf
    wait = cooldown_counter = 0
    lr, lrs = lr0, []
    for current in metrics:
        lrs.append(lr)
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if better(current, best):
            best, wait = current, 0
        elif not cooldown_counter > 0:
            wait += 1
            if wait >= patience and lr > min_lr:
                lr = max(lr * factor, min_lr)
                cooldown_counter, wait = cooldown, 0
    return lrs


# --- schedules --------------------------------------------------------------------------


def test_constant_keeps_the_initial_rate() -> None:
    lrs = run(ScheduleConfig(name="constant"), epochs=4, steps=3)
    assert per_epoch(lrs) == [LR0] * 4


def test_linear_is_the_lectures_sc_over_70_epochs() -> None:
    def sc(epoch: int) -> float:  # the lecture's schedule function
        alpha = min(epoch / 50, 1.0)
        return 0.02 * (1 - alpha) + 0.0001 * alpha

    lrs = per_epoch(
        run(ScheduleConfig(name="linear", final_lr=1e-4, horizon=50), epochs=70, steps=2)
    )
    assert lrs == pytest.approx([sc(k) for k in range(70)], rel=1e-12)
    assert lrs[0] == 0.02 and lrs[50] == pytest.approx(1e-4) and lrs[69] == pytest.approx(1e-4)


def test_linear_horizon_defaults_to_the_run_length() -> None:
    lrs = per_epoch(run(ScheduleConfig(name="linear", final_lr=1e-3), epochs=5, steps=1))
    expected = [(1 - k / 5) * LR0 + (k / 5) * 1e-3 for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_inverse_time_decays_per_batch_as_keras_decay() -> None:
    epochs, steps = 4, 108  # 5400 training images / batch size 50
    lrs = run(ScheduleConfig(name="inverse_time", decay=1e-5), epochs=epochs, steps=steps)
    flat = [lr for used in lrs for lr in used]
    assert flat == pytest.approx([0.02 / (1 + 1e-5 * k) for k in range(epochs * steps)], rel=1e-12)
    assert flat[0] == 0.02  # the first batch uses eta0


def test_inverse_time_with_the_lectures_plot_decay() -> None:
    lrs = run(ScheduleConfig(name="inverse_time", decay=1e-3), epochs=2, steps=108)
    flat = [lr for used in lrs for lr in used]
    assert flat == pytest.approx([0.02 / (1 + 1e-3 * k) for k in range(216)], rel=1e-12)


def test_plateau_reduces_at_the_epochs_of_the_lectures_keras_log() -> None:
    # val_loss improves up to epoch 19 (0-based), then stays flat: Keras with patience 5
    # printed reductions at "Epoch 00025", 00030, ..., 00050 (1-based).
    metrics = [1.0 - 0.01 * k for k in range(20)] + [0.81] * 30
    cfg = ScheduleConfig(name="plateau", monitor="val_loss", factor=0.1, patience=5)
    weight, optimizer, schedule = make_run(cfg, epochs=50, steps=2)
    lrs = per_epoch(train(weight, optimizer, schedule, epochs=range(50), steps=2, metrics=metrics))
    lrs.append(schedule.current_lr())  # the rate after the last epoch's reduction
    reduced_after = [k + 1 for k in range(50) if lrs[k + 1] < lrs[k]]  # Keras' 1-based epoch
    assert reduced_after == [25, 30, 35, 40, 45, 50]
    assert lrs[25] == pytest.approx(0.002) and lrs[50] == pytest.approx(2e-8)


def test_plateau_cooldown_and_min_lr_follow_keras() -> None:
    # patience 3, cooldown 2: first reduction after the 3rd bad epoch (epoch 7); in Keras the
    # cooldown counter reaches 0 on epoch 9, which already counts as bad, so the next
    # reduction is at epoch 11 (every patience + cooldown - 1 = 4 epochs).
    metrics = [1.0 - 0.1 * k for k in range(5)] + [0.6] * 15
    cfg = ScheduleConfig(
        name="plateau", factor=0.5, patience=3, cooldown=2, min_lr=0.006, min_delta=0.0
    )
    lrs = per_epoch(run(cfg, epochs=20, steps=1, metrics=metrics))
    assert lrs[:8] == [0.02] * 8
    assert lrs[8:12] == [0.01] * 4
    assert lrs[12:] == [0.006] * 8  # max(0.01 * 0.5, min_lr), then held at the floor


def test_plateau_min_delta_is_absolute() -> None:
    # Improvements of 1e-5 per epoch are below min_delta 1e-4: a plateau from epoch 1.
    metrics = [1.0 - 1e-5 * k for k in range(8)]
    lrs = per_epoch(
        run(ScheduleConfig(name="plateau", patience=5), epochs=8, steps=1, metrics=metrics)
    )
    assert lrs == pytest.approx([0.02] * 6 + [0.002] * 2)


def test_plateau_keeps_reducing_below_1e8_as_keras_does() -> None:
    # torch's default eps=1e-8 would skip reductions smaller than 1e-8; Keras does not.
    cfg = ScheduleConfig(name="plateau", patience=1, min_delta=0.0)
    lrs = per_epoch(run(cfg, lr0=1e-6, epochs=6, steps=1, metrics=[1.0] * 6))
    assert lrs == pytest.approx([1e-6, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10], rel=1e-9)


def test_plateau_on_val_acc_maximises() -> None:
    metrics = [0.5, 0.6, 0.7, 0.7, 0.7, 0.9, 0.9, 0.9]
    cfg = ScheduleConfig(name="plateau", monitor="val_acc", patience=2, min_delta=0.0)
    lrs = per_epoch(run(cfg, epochs=8, steps=1, metrics=metrics))
    # bad epochs 3, 4 -> reduce after epoch 4; the rise at 5 resets; bad 6, 7 -> after 7.
    assert lrs == pytest.approx([0.02] * 5 + [0.002] * 3)


def test_plateau_without_the_monitored_metric_is_an_error() -> None:
    _, _, schedule = make_run(ScheduleConfig(name="plateau", monitor="val_acc"), epochs=3, steps=1)
    with pytest.raises(DeepoptError, match="val_acc"):
        schedule.after_epoch({"val_loss": 0.3})


def test_step_multiplies_by_gamma_every_step_size_epochs() -> None:
    lrs = per_epoch(run(ScheduleConfig(name="step", step_size=3, gamma=0.5), epochs=10, steps=2))
    assert lrs == pytest.approx([LR0 * 0.5 ** (k // 3) for k in range(10)], rel=1e-12)


def test_cosine_with_warmup_ends_at_min_lr() -> None:
    epochs, warmup, min_lr = 12, 3, 1e-4
    cfg = ScheduleConfig(name="cosine", warmup_epochs=warmup, min_lr=min_lr)
    lrs = per_epoch(run(cfg, epochs=epochs, steps=2))
    expected = [LR0 * (k + 1) / (warmup + 1) for k in range(warmup)]
    expected += [
        min_lr + (LR0 - min_lr) * (1 + math.cos(math.pi * (k - warmup) / (epochs - 1 - warmup))) / 2
        for k in range(warmup, epochs)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[warmup] == pytest.approx(LR0) and lrs[-1] == pytest.approx(min_lr)


def test_cosine_without_warmup_starts_at_eta0() -> None:
    lrs = per_epoch(run(ScheduleConfig(name="cosine"), epochs=5, steps=1))
    floor = LR0 * COSINE_FLOOR  # the default min_lr: the last epoch trains too
    expected = [floor + (LR0 - floor) * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert lrs == pytest.approx(expected) and lrs[-1] == pytest.approx(floor)


def test_cosine_refuses_a_floor_of_zero() -> None:
    with pytest.raises(ValueError, match=r"schedule\.min_lr: 0 would train cosine's last epoch"):
        ScheduleConfig(name="cosine", min_lr=0.0)


def test_cosine_warmup_must_leave_a_cosine_epoch() -> None:
    with pytest.raises(ConfigError, match="warmup_epochs"):
        make_run(ScheduleConfig(name="cosine", warmup_epochs=5), epochs=5, steps=1)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_configurable_schedule_builds_and_only_inverse_time_steps_per_batch(
    name: str,
) -> None:
    _, _, schedule = make_run(ScheduleConfig(name=name), epochs=3, steps=2)  # type: ignore[arg-type]
    assert schedule.name == name and schedule.per_batch == (name == "inverse_time")


def test_schedules_take_their_defaults_from_the_config_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SCHEDULE_KNOBS is the one table of defaults: changing it changes the built schedule.
    monkeypatch.setitem(SCHEDULE_KNOBS["step"], "gamma", 0.5)
    monkeypatch.setitem(SCHEDULE_KNOBS["step"], "step_size", 2)
    lrs = per_epoch(run(ScheduleConfig(name="step"), epochs=5, steps=1))
    assert lrs == pytest.approx([LR0, LR0, LR0 / 2, LR0 / 2, LR0 / 4], rel=1e-12)
    monkeypatch.setitem(SCHEDULE_KNOBS["inverse_time"], "decay", 0.5)
    flat = [
        lr for used in run(ScheduleConfig(name="inverse_time"), epochs=1, steps=3) for lr in used
    ]
    assert flat == pytest.approx([LR0, LR0 / 1.5, LR0 / 2], rel=1e-12)


ROUND_TRIP_CASES: list[tuple[dict[str, Any], list[float] | None]] = [
    ({"name": "constant"}, None),
    ({"name": "linear", "horizon": 6}, None),
    ({"name": "inverse_time", "decay": 0.01}, None),
    ({"name": "step", "step_size": 2, "gamma": 0.5}, None),
    ({"name": "cosine", "warmup_epochs": 2, "min_lr": 1e-4}, None),
    (
        {"name": "plateau", "patience": 2, "cooldown": 2, "min_delta": 0.0},
        [0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
    ),
]


@pytest.mark.parametrize(("raw", "metrics"), ROUND_TRIP_CASES)
def test_state_dict_round_trip_continues_the_sequence(
    raw: dict[str, Any], metrics: list[float] | None, tmp_path: Path
) -> None:
    cfg, epochs, steps, cut = ScheduleConfig(**raw), 10, 3, 4
    uninterrupted = run(cfg, epochs=epochs, steps=steps, metrics=metrics)

    monitor = cfg.monitor or "val_loss"
    weight, optimizer, schedule = make_run(cfg, epochs=epochs, steps=steps)
    first = train(
        weight,
        optimizer,
        schedule,
        epochs=range(cut),
        steps=steps,
        metrics=metrics,
        monitor=monitor,
    )
    path = tmp_path / "schedule.pt"
    torch.save({"schedule": schedule.state_dict()}, path)

    # A fresh optimizer and schedule (as after a restart); only the schedule state is loaded.
    weight, optimizer, schedule = make_run(cfg, epochs=epochs, steps=steps)
    schedule.load_state_dict(torch.load(path, weights_only=True)["schedule"])
    rest = train(
        weight,
        optimizer,
        schedule,
        epochs=range(cut, epochs),
        steps=steps,
        metrics=metrics,
        monitor=monitor,
    )
    assert first + rest == uninterrupted


def test_loading_another_schedules_state_is_an_error() -> None:
    _, _, linear = make_run(ScheduleConfig(name="linear"), epochs=3, steps=1)
    _, _, step = make_run(ScheduleConfig(name="step"), epochs=3, steps=1)
    with pytest.raises(DeepoptError, match="does not match"):
        step.load_state_dict(linear.state_dict())


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["constant", "linear", "inverse_time", "plateau", "step", "cosine"]),
    lr0=st.floats(1e-4, 1.0),
    decay=st.floats(1e-6, 0.5),
    horizon=st.integers(1, 30),
    final_lr=st.floats(1e-6, 1.0),
    epochs=st.integers(2, 20),
    steps=st.integers(1, 4),
    step_size=st.integers(1, 8),
    gamma=st.floats(0.05, 1.0),
    warmup_fraction=st.floats(0.0, 0.99),
    min_lr_fraction=st.floats(1e-4, 1.0),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    factor=st.floats(0.05, 0.9),
    min_delta=st.sampled_from([0.0, 0.05, 0.1]),
    monitor=st.sampled_from(["val_loss", "val_acc"]),
    metric_steps=st.lists(st.integers(0, 6), min_size=20, max_size=20),
)
def test_every_schedule_is_positive_finite_and_matches_its_formula(
    name: str,
    lr0: float,
    decay: float,
    horizon: int,
    final_lr: float,
    epochs: int,
    steps: int,
    step_size: int,
    gamma: float,
    warmup_fraction: float,
    min_lr_fraction: float,
    patience: int,
    cooldown: int,
    factor: float,
    min_delta: float,
    monitor: str,
    metric_steps: list[int],
) -> None:
    warmup = int(warmup_fraction * epochs)
    min_lr = lr0 * min_lr_fraction
    metrics = [0.1 * m for m in metric_steps]  # coarse values: many ties and plateaus
    knobs: dict[str, dict[str, Any]] = {
        "constant": {},
        "linear": {"final_lr": final_lr, "horizon": horizon},
        "inverse_time": {"decay": decay},
        "step": {"step_size": step_size, "gamma": gamma},
        "cosine": {"warmup_epochs": warmup, "min_lr": min_lr},
        "plateau": {
            "monitor": monitor,
            "factor": factor,
            "patience": patience,
            "cooldown": cooldown,
            "min_delta": min_delta,
            "min_lr": min_lr * 1e-3,
        },
    }
    lrs = run(
        ScheduleConfig(name=name, **knobs[name]),
        lr0=lr0,
        epochs=epochs,
        steps=steps,
        metrics=metrics,
    )
    flat = [lr for used in lrs for lr in used]
    assert all(math.isfinite(lr) and lr > 0 for lr in flat)

    if name == "inverse_time":
        expected_flat = [lr0 / (1 + decay * k) for k in range(epochs * steps)]
        assert flat == pytest.approx(expected_flat, rel=1e-9)
        return
    by_epoch = per_epoch(lrs)
    if name == "constant":
        expected = [lr0] * epochs
    elif name == "linear":
        expected = [
            (1 - min(k / horizon, 1)) * lr0 + min(k / horizon, 1) * final_lr for k in range(epochs)
        ]
    elif name == "step":
        expected = [lr0 * gamma ** (k // step_size) for k in range(epochs)]
    elif name == "cosine":
        span = max(epochs - 1 - warmup, 1)
        expected = [
            lr0 * (k + 1) / (warmup + 1)
            if k < warmup
            else min_lr + (lr0 - min_lr) * (1 + math.cos(math.pi * (k - warmup) / span)) / 2
            for k in range(epochs)
        ]
    else:
        expected = keras_plateau(
            metrics[:epochs],
            lr0=lr0,
            factor=factor,
            patience=patience,
            min_delta=min_delta,
            cooldown=cooldown,
            min_lr=min_lr * 1e-3,
            mode="max" if monitor == "val_acc" else "min",
        )
    assert by_epoch == pytest.approx(expected, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["constant", "linear", "inverse_time", "plateau", "step", "cosine"]),
    lr0=st.floats(1e-5, 1.0),
    epochs=st.integers(1, 120),
    steps=st.integers(1, 3),
    metric_steps=st.lists(st.integers(0, 3), min_size=120, max_size=120),
)
def test_every_schedule_with_its_default_knobs_trains_every_epoch_at_a_positive_rate(
    name: str, lr0: float, epochs: int, steps: int, metric_steps: list[int]
) -> None:
    # The knobs a config leaves out: the case most runs are, over runs up to 120 epochs
    # (the formulas with explicit knobs are checked above).
    metrics = [0.5 + 0.1 * m for m in metric_steps]  # mostly no improvement: plateau reduces
    lrs = run(ScheduleConfig(name=name), lr0=lr0, epochs=epochs, steps=steps, metrics=metrics)
    flat = [lr for used in lrs for lr in used]
    assert len(flat) == epochs * steps
    assert all(math.isfinite(lr) and lr > 0 for lr in flat)


# --- optimizers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_each_optimizer_lowers_a_quadratic(name: str) -> None:
    target = torch.tensor([1.0, -2.0, 0.5])
    weight = nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([weight], OptimConfig(name=name, lr=0.05))  # type: ignore[arg-type]

    def loss() -> torch.Tensor:
        return ((weight - target) ** 2).sum()

    start = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * start


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sgd", torch.optim.SGD),
        ("momentum", torch.optim.SGD),
        ("nesterov", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_weight_decay_reaches_the_param_groups(name: str, kind: type) -> None:
    optimizer = build_optimizer(
        [nn.Parameter(torch.zeros(2))],
        OptimConfig(name=name, lr=0.01, weight_decay=5e-4),  # type: ignore[arg-type]
    )
    assert type(optimizer) is kind
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_sgd_variants_set_momentum_and_nesterov() -> None:
    def group(name: str, **knobs: Any) -> dict[str, Any]:
        cfg = OptimConfig(name=name, **knobs)  # type: ignore[arg-type]
        return build_optimizer([nn.Parameter(torch.zeros(2))], cfg).param_groups[0]

    assert (group("sgd")["momentum"], group("sgd")["nesterov"]) == (0.0, False)
    assert (group("momentum")["momentum"], group("momentum")["nesterov"]) == (0.9, False)
    assert (group("nesterov")["momentum"], group("nesterov")["nesterov"]) == (0.9, True)
    assert group("nesterov", momentum=0.5)["momentum"] == 0.5


def test_rmsprop_alpha_is_rho() -> None:
    cfg = OptimConfig(name="rmsprop", rho=0.9, eps=1e-6, momentum=0.3)
    g = build_optimizer([nn.Parameter(torch.zeros(2))], cfg).param_groups[0]
    assert (g["alpha"], g["eps"], g["momentum"]) == (0.9, 1e-6, 0.3)


def test_adam_betas_and_eps_and_adagrad_eps() -> None:
    adam = OptimConfig(name="adam", betas=(0.8, 0.99), eps=1e-7)
    g = build_optimizer([nn.Parameter(torch.zeros(2))], adam).param_groups[0]
    assert (g["betas"], g["eps"]) == ((0.8, 0.99), 1e-7)
    adagrad = OptimConfig(name="adagrad", eps=1e-6)
    assert build_optimizer([nn.Parameter(torch.zeros(2))], adagrad).param_groups[0]["eps"] == 1e-6


def test_optimizers_take_their_defaults_from_the_config_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(OPTIMIZER_KNOBS["adagrad"], "eps", 1e-3)
    monkeypatch.setitem(OPTIMIZER_KNOBS["nesterov"], "momentum", 0.5)
    for name, key, value in (("adagrad", "eps", 1e-3), ("nesterov", "momentum", 0.5)):
        cfg = OptimConfig(name=name)  # type: ignore[arg-type]
        group = build_optimizer([nn.Parameter(torch.zeros(2))], cfg).param_groups[0]
        assert group[key] == value


def test_param_groups_keep_their_own_overrides() -> None:
    decayed, plain = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(
        [{"params": [decayed]}, {"params": [plain], "weight_decay": 0.0}],
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01),
    )
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
