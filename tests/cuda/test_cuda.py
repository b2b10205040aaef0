"""The training core on a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them).

Only torch and deepopt's core: no mlflow, dvc or optuna, which a GPU machine may lack.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from deepopt import devices
from deepopt.config import EarlyStopConfig, ModelConfig, OptimConfig, ScheduleConfig
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training.checkpoint import load_checkpoint, save_checkpoint
from deepopt.training.loop import FitResult, LoopState, fit
from tiny_data import gaussian_blobs

pytestmark = pytest.mark.cuda

EPOCHS = 4


@pytest.fixture(scope="module", autouse=True)
def _deterministic_cuda() -> None:
    """train.deterministic on CUDA, as a stage sets it (before the module's first CUDA tensor)."""
    devices.configure_backends(torch.device("cuda"), deterministic=True, tf32=False)


def _blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_blobs(count, seed, size=12)


def _run(
    device: torch.device,
    *,
    precision: str = "fp32",
    start: LoopState | None = None,
    stop_after: int | None = None,
    dropout: float = 0.2,
    epochs: int = EPOCHS,
) -> tuple[FitResult | None, list[LoopState]]:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="lecture_cnn", conv_channels=(4, 8, 8), dense_units=16, dropout=dropout),
        image_shape=(1, 12, 12),
    ).to(device)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="nesterov"))
    schedule = build_schedule(
        optimizer, ScheduleConfig(name="inverse_time", decay=1e-2), epochs=epochs, steps_per_epoch=8
    )
    states: list[LoopState] = []

    def on_epoch_end(state: LoopState) -> None:
        states.append(copy.deepcopy(state))
        if stop_after is not None and state.epochs_done == stop_after:
            raise KeyboardInterrupt

    try:
        result = fit(
            model,
            optimizer,
            schedule,
            _blobs(200, 1),
            _blobs(100, 2),
            epochs=epochs,
            batch_size=25,
            early_stop=EarlyStopConfig(enabled=False),
            seed=7,
            precision=precision,
            start=start,
            on_epoch_end=on_epoch_end,
            device=device,
        )
    except KeyboardInterrupt:
        return None, states
    return result, states


def _metrics(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The records without their wall times."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_deterministic_mode_repeats_to_the_last_digit() -> None:
    first, _ = _run(CUDA)
    second, _ = _run(CUDA)
    assert first is not None and second is not None
    assert _metrics(first.history) == _metrics(second.history)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32


def _checkpoint(tmp_path: Path, state: LoopState) -> LoopState:
    """``state`` through a real checkpoint file (saved with CPU tensors, loaded back)."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"loop": state.to_dict(), "run_id": "cuda-test", "finished": False})
    payload = load_checkpoint(path)
    assert payload is not None
    loaded = payload["loop"]
    assert all(t.device.type == "cpu" for t in loaded["model"].values())
    return LoopState.from_dict(loaded)


@pytest.mark.parametrize("device", [CUDA, CPU], ids=["cuda", "cpu"])
def test_resume_on_the_same_device_equals_an_uninterrupted_run(
    tmp_path: Path, device: torch.device
) -> None:
    whole, _ = _run(device)
    _, states = _run(device, stop_after=2)
    resumed, _ = _run(device, start=_checkpoint(tmp_path, states[-1]))
    assert whole is not None and resumed is not None
    assert _metrics(resumed.history) == _metrics(whole.history)


@pytest.mark.parametrize(("written", "resumed_on"), [(CUDA, CPU), (CPU, CUDA)], ids=str)
def test_a_checkpoint_resumes_on_the_other_device(
    tmp_path: Path, written: torch.device, resumed_on: torch.device
) -> None:
    """The first epochs are kept as written; the rest trains finite on the other device
    (its last digits differ from the writer's: other kernels, other reduction order)."""
    _, states = _run(written, stop_after=2, dropout=0.0)
    resumed, _ = _run(resumed_on, start=_checkpoint(tmp_path, states[-1]), dropout=0.0)
    assert resumed is not None and resumed.epochs_run == EPOCHS
    assert _metrics(resumed.history[:2]) == _metrics(states[-1].history)
    later = resumed.history[2:]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) for r in later)
    reference, _ = _run(written, dropout=0.0)
    assert reference is not None
    assert resumed.history[-1]["val_loss"] == pytest.approx(
        reference.history[-1]["val_loss"], rel=1e-2
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_finite(precision: str) -> None:
    result, states = _run(CUDA, precision=precision, epochs=2)
    assert result is not None and result.stop_reason == "max_epochs"
    assert all(math.isfinite(v) for record in result.history for v in record.values())
    assert result.history[-1]["val_acc"] > 0.2  # ten classes: better than chance
    scaler: dict[str, Any] | None = states[-1].grad_scaler
    assert (scaler is not None) == (precision == "fp16")


def test_data_lives_on_the_device_during_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """fit moves the tensors to the GPU once: every batch the network sees is already there,
    and no CPU tensor of batch size passes through the forward."""
    from deepopt.training import loop

    seen: list[torch.device] = []
    moves: list[tuple[torch.device, int]] = []
    original_to = torch.Tensor.to

    def counting_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            moves.append((out.device, out.numel()))
        return out

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="lecture_cnn", conv_channels=(4, 8, 8), dense_units=16),
        image_shape=(1, 12, 12),
    ).to(CUDA)
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].device))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="nesterov"))
    schedule = build_schedule(
        optimizer, ScheduleConfig(name="inverse_time", decay=1e-2), epochs=2, steps_per_epoch=8
    )
    train = tuple(t.to(CUDA) for t in _blobs(200, 1))
    val = tuple(t.to(CUDA) for t in _blobs(100, 2))
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    result = loop.fit(
        model,
        optimizer,
        schedule,
        train,  # type: ignore[arg-type]
        val,  # type: ignore[arg-type]
        epochs=2,
        batch_size=25,
        early_stop=EarlyStopConfig(enabled=False),
        seed=7,
    )
    assert result.epochs_run == 2
    assert seen and all(d.type == "cuda" for d in seen)
    # At most each epoch's permutation (200 indices) leaves the host; a batch is 25 images.
    assert len(moves) <= 2 and all(n <= 200 for _, n in moves), moves
