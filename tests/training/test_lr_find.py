"""The LR range test on a tiny network: fastai's schedule and stop rule, the valley
suggestion (against fastai's own loop), and a model and optimizer left exactly as found."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepopt.config import EarlyStopConfig, ModelConfig, OptimConfig, ScheduleConfig
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training import fit
from deepopt.training.lr_find import (
    DIVERGENCE_FACTOR,
    SMOOTHING,
    lr_at,
    lr_range_test,
    suggestion_index,
    valley,
)
from tiny_data import gaussian_blobs


def _fastai_valley(losses: list[float]) -> int:
    """fastai/callback/schedule.py's ``valley`` index, its double loop as written there."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def _network(optimizer: str = "nesterov") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # BatchNorm (running statistics: buffers) and dropout (the global RNG) both in play.
    model = build_model(
        ModelConfig(name="mlp", depth=2, width=32, dropout=0.2, batchnorm=True),
        image_shape=(1, 8, 8),
    )
    return model, build_optimizer(model.parameters(), OptimConfig(name=optimizer))  # type: ignore[arg-type]


def _test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Any:
    settings: dict[str, Any] = {"batch_size": 25, "seed": 3, **options}
    return lr_range_test(model, optimizer, gaussian_blobs(200, 1), **settings)


def test_the_rates_are_fastais_exponential_schedule_and_the_suggestion_lies_within_them() -> None:
    model, optimizer = _network()
    result = _test(model, optimizer, stop_div=False, end_lr=1.0)
    assert result.stop_reason == "num_iter" and len(result.lrs) == 100
    # SchedExp(1e-7, 1)(i / 100): batch 99 trains just below end_lr, as fastai's.
    assert result.lrs == [1e-7 * (1.0 / 1e-7) ** (i / 100) for i in range(100)]
    assert result.lrs[-1] < 1.0
    assert result.suggestion is not None and 1e-7 <= result.suggestion <= 1.0
    assert result.suggestion == result.lrs[result.suggestion_step]
    # in the kept part of the curve: not the first tenth, not the last 5 points
    assert 10 <= result.suggestion_step < 95
    assert min(result.losses[:10]) > min(result.losses)  # the network learns on the way


def test_the_recorded_loss_is_fastais_debiased_moving_average() -> None:
    model, optimizer = _network()
    result = _test(model, optimizer, num_iter=6, stop_div=False)
    # The first smoothed value is the first batch's loss: (1 - beta) loss / (1 - beta).
    model2, optimizer2 = _network()
    torch.manual_seed(3)  # the test's dropout seed
    images, labels = gaussian_blobs(200, 1)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    model2.train()
    for group in optimizer2.param_groups:
        group["lr"] = lr_at(0, start_lr=1e-7, end_lr=10.0, num_iter=6)
    loss = torch.nn.functional.cross_entropy(model2(images[order[:25]]), labels[order[:25]])
    # Debiased: not (1 - beta) x the loss, which the bare moving average starts from.
    assert result.losses[0] == pytest.approx(loss.item(), rel=1e-6)
    assert result.losses[0] != pytest.approx((1 - SMOOTHING) * loss.item())


def test_it_stops_once_the_smoothed_loss_passes_four_times_its_best() -> None:
    model, optimizer = _network()
    result = _test(model, optimizer, end_lr=1e4, num_iter=200)
    assert result.stop_reason in ("diverged", "non_finite")
    assert len(result.lrs) < 200
    if result.stop_reason == "diverged":
        assert result.losses[-1] > DIVERGENCE_FACTOR * min(result.losses[:-1])
        # ... and not at any earlier batch
        for i, loss in enumerate(result.losses[:-1]):
            assert loss <= DIVERGENCE_FACTOR * min(result.losses[: i + 1])
    assert all(math.isfinite(x) for x in result.losses)


def test_without_stop_div_it_runs_on_until_the_loss_is_not_finite() -> None:
    model, optimizer = _network()
    stopping = _test(model, optimizer, end_lr=1e4, num_iter=200)
    running = _test(model, optimizer, end_lr=1e4, num_iter=200, stop_div=False)
    assert running.stop_reason in ("num_iter", "non_finite")
    assert len(running.lrs) > len(stopping.lrs)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "training": model.training,
            "grads": [p.grad for p in model.parameters()],
        }
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", ["nesterov", "adam"])  # velocity; moments and Keras' eps hook
def test_the_model_and_the_optimizer_are_restored_bit_exactly(name: str) -> None:
    model, optimizer = _network(name)
    schedule = build_schedule(
        optimizer, ScheduleConfig(name="constant"), epochs=2, steps_per_epoch=8
    )

    def train(epochs: int) -> list[dict[str, float]]:
        result = fit(
            model,
            optimizer,
            schedule,
            gaussian_blobs(200, 1),
            gaussian_blobs(100, 2),
            epochs=epochs,
            batch_size=25,
            early_stop=EarlyStopConfig(enabled=False),
            seed=7,
        )
        return [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]

    train(1)  # an optimizer with state (momentum buffers, Adam's moments and steps)
    model.eval()
    before = _state(model, optimizer)
    _test(model, optimizer, end_lr=1e3)  # diverges: the weights it leaves behind are ruined
    assert _equal(_state(model, optimizer), before)

    # ... and training on from there gives what it gives without the test in between.
    with_test = train(2)
    model, optimizer = _network(name)
    schedule = build_schedule(
        optimizer, ScheduleConfig(name="constant"), epochs=2, steps_per_epoch=8
    )
    train(1)
    assert train(2) == with_test


def test_valley_of_a_hand_made_curve() -> None:
    # A plateau creeping up (10 points), a steady descent (30), then divergence (10).
    losses = [2.3 + 0.001 * i for i in range(10)]
    losses += [2.3 - 0.05 * k for k in range(1, 31)]
    losses += [1.0 + 0.5 * k for k in range(10)]
    # The longest decreasing run: one plateau point and the 30 descending ones, ending at
    # index 39; it "starts" 31 points before (index 8), and 10 + 5 points in is index 23.
    assert valley(losses) == _fastai_valley(losses) == 23
    assert 10 <= valley(losses) < 40  # on the descent, about 2/3 of the way down


def test_valley_edge_cases() -> None:
    assert valley([1.0]) == 0
    assert valley([3.0, 2.0, 1.0]) == 0
    assert valley([1.0, 2.0, 3.0]) == 0  # no descent at all: the first point
    # fastai's index is -1 (its last point) when the longest run is the first two points
    assert _fastai_valley([2.0, 1.0, 5.0]) == -1 and valley([2.0, 1.0, 5.0]) == 0
    with pytest.raises(ValueError):
        valley([])


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=60))
def test_valley_is_fastais_index(losses: list[float]) -> None:
    assert valley(losses) == max(0, _fastai_valley(losses))


def test_the_suggestion_skips_the_first_tenth_and_the_last_five_points() -> None:
    losses = [float(100 - i) for i in range(100)]  # one descent over all of them
    kept = losses[10:95]
    assert suggestion_index(losses, 100) == 10 + valley(kept)
    assert suggestion_index(losses[:15], 100) is None  # 15 points: nothing left after skipping
    assert suggestion_index(losses[:16], 100) == 10
    # a curve that ended at a NaN: fastai recorded all 100 and drops its last 5, not ours
    assert suggestion_index(losses[:40], 100, ended_non_finite=True) == 10 + valley(losses[10:40])


def test_bad_arguments_are_refused() -> None:
    model, optimizer = _network()
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        _test(model, optimizer, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="num_iter"):
        _test(model, optimizer, num_iter=0)
