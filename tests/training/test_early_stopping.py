"""Early stopping against Keras' rule (keras/src/callbacks/early_stopping.py), written out
here: patience 0 trains until the first epoch without improvement, as patience 1 does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepopt.config import EarlyStopConfig, ModelConfig, OptimConfig, ScheduleConfig
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training import EarlyStopping, fit
from tiny_data import gaussian_blobs


def keras_epochs_run(losses: list[float], patience: int, min_delta: float) -> int:
    """Epochs Keras trains with EarlyStopping(monitor='val_loss') on these losses."""
    wait, best = 0, None
    for epoch, current in enumerate(losses):  # on_epoch_end
        wait += 1
        if best is None or current + min_delta < best:  # _is_improvement, mode min
            best, wait = current, 0
            continue
        if wait >= patience and epoch > 0:
            return epoch + 1  # stop_training after this epoch
    return len(losses)


def deepopt_epochs_run(losses: list[float], patience: int, min_delta: float) -> int:
    """Epochs deepopt trains: the loop asks should_stop before each epoch (training/loop.py)."""
    stopper = EarlyStopping(EarlyStopConfig(min_delta=min_delta, patience=patience))
    for epoch, loss in enumerate(losses):
        if stopper.should_stop:
            return epoch
        stopper.update(epoch, {"val_loss": loss})
    return len(losses)


@given(
    losses=st.lists(st.sampled_from([0.5, 0.4, 0.3, 0.35, 0.2999, 0.1]), min_size=1, max_size=20),
    patience=st.integers(0, 6),
)
def test_stops_at_the_epoch_keras_stops(losses: list[float], patience: int) -> None:
    assert deepopt_epochs_run(losses, patience, 1e-3) == keras_epochs_run(losses, patience, 1e-3)


@pytest.mark.parametrize("patience", [0, 1])
def test_patience_0_and_1_stop_at_the_first_epoch_without_improvement(patience: int) -> None:
    losses = [0.5, 0.4, 0.3, 0.31, 0.2, 0.1]  # epoch 3 (0-based) is the first not to improve
    assert deepopt_epochs_run(losses, patience, 0.0) == 4


def test_patience_5_waits_five_epochs_without_improvement() -> None:
    losses = [0.5, 0.4] + [0.45] * 10
    assert deepopt_epochs_run(losses, 5, 0.0) == 7  # epochs 2-6 wait, then stop


def test_an_improving_epoch_never_stops_even_with_patience_0() -> None:
    stopper = EarlyStopping(EarlyStopConfig(patience=0))
    assert not stopper.should_stop  # nothing seen yet: train the first epoch
    assert stopper.update(0, {"val_loss": 1.0}) and not stopper.should_stop
    assert stopper.update(1, {"val_loss": 0.5}) and not stopper.should_stop
    assert not stopper.update(2, {"val_loss": 0.6}) and stopper.should_stop


def test_disabled_never_stops() -> None:
    stopper = EarlyStopping(EarlyStopConfig(enabled=False, patience=0))
    stopper.update(0, {"val_loss": 1.0})
    stopper.update(1, {"val_loss": 2.0})
    assert not stopper.should_stop


@pytest.mark.parametrize("patience", [0, 1])
def test_fit_with_patience_0_or_1_trains_until_the_first_non_improving_epoch(
    patience: int,
) -> None:
    # min_delta so large that no epoch after the first improves: epoch 1 is the first
    # without improvement, and training stops after it (before: patience 0 ran 0 epochs).
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=1, width=16), image_shape=(1, 8, 8))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="nesterov", lr=0.05))
    schedule = build_schedule(optimizer, ScheduleConfig(), epochs=10, steps_per_epoch=4)
    result = fit(
        model,
        optimizer,
        schedule,
        gaussian_blobs(100, 1),
        gaussian_blobs(50, 2),
        epochs=10,
        batch_size=25,
        early_stop=EarlyStopConfig(min_delta=100.0, patience=patience),
        seed=0,
    )
    assert (result.epochs_run, result.stop_reason, result.best_epoch) == (2, "early_stop", 0)
    assert len(result.history) == 2
