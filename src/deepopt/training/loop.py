"""The training loop: preloaded tensors, seeded batching, a state to resume from.

Nothing here does I/O or tracking. The caller passes ``on_epoch_end`` (checkpointing,
MLflow, progress, Optuna pruning) and gets a ``FitResult`` back. A run can start from a
``LoopState`` taken from a checkpoint and then continues exactly as if never stopped: the
shuffling generator, the global torch RNG (dropout), the optimizer, the schedule and the
early-stopping counters are all part of the state (the resume contract).

The device is the tensors' (or ``device``): the prepared tensors are moved there once, each
epoch's permutation is drawn on the CPU (the same order on every device, so seeds pair across
devices) and moved once, batches are index slices on the device, and the epoch's metrics
come back in one sync at its end.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from deepopt import devices, interrupts
from deepopt.config import EarlyStopConfig
from deepopt.metrics import loss_and_accuracy_of_logits
from deepopt.optim import LRSchedule
from deepopt.training.diagnostics import EpochDiagnostics
from deepopt.training.early_stopping import EarlyStopping
from deepopt.training.memory import keep_freed_memory

__all__ = [
    "BatchCallback",
    "DataParallel",
    "FitResult",
    "LoopState",
    "StopReason",
    "evaluate_logits",
    "fit",
    "steps_per_epoch",
]

StopReason = Literal["early_stop", "max_epochs", "diverged", "interrupted"]
# Called after every training batch with (epoch, batches done, batches in the epoch, the
# running mean loss of the epoch): the loss is a function because reading it syncs with the
# device, so a progress bar reads it only when it shows it (deepopt.training.progress).
BatchCallback = Callable[[int, int, int, Callable[[], float]], None]


@dataclass
class LoopState:
    """Everything needed to continue a run after the epoch ``epochs_done``."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None
    best_model: dict[str, Any] | None = None  # only with restore_best
    shuffle_rng: torch.Tensor | None = None
    torch_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None  # the training GPU's generator (dropout on CUDA)
    grad_scaler: dict[str, Any] | None = None  # fp16's GradScaler (its scale and counters)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]]
    epochs_run: int
    stop_reason: StopReason
    best_epoch: int  # epoch (0-based) with the best monitored value, -1 if none
    train_seconds: float  # wall time of the epochs run in this process


class DataParallel(Protocol):
    """What ``fit`` needs of a data-parallel process group (deepopt.training.distributed): each
    process trains on its shard of every global batch of ``world_size * batch_size``."""

    @property
    def world_size(self) -> int: ...

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float] | None: ...

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None: ...

    def evaluate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        precision: str,
    ) -> tuple[float, float]: ...


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in an epoch: global batches of ``world_size * batch_size``; a last
    batch with fewer samples than processes is skipped (see ``DataParallel.shard``)."""
    full, rest = divmod(samples, batch_size * world_size)
    return full + (1 if rest >= world_size else 0)


@torch.inference_mode()
def evaluate_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits for all ``images`` [N,C,H,W] in eval mode, in large batches: [N, classes] on
    the images' device. The network runs on ``device`` (default: the model's), where the
    images are moved once (nothing moves when they are there already, as in ``fit``)."""
    model.eval()
    device = device or _device_of(model, images)
    inputs = images.to(device)
    with devices.autocast(device, precision):
        chunks = [
            model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)
        ]
    return torch.cat(chunks).to(images.device)


def _device_of(model: nn.Module, images: torch.Tensor) -> torch.device:
    """Where ``model``'s parameters are (the images' device for a network without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else images.device


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    early_stop: EarlyStopConfig,
    seed: int,
    eval_batch_size: int = 1000,
    precision: str = "fp32",
    diagnostics: bool = False,
    start: LoopState | None = None,
    on_epoch_end: Callable[[LoopState], None] | None = None,
    parallel: DataParallel | None = None,
    device: torch.device | None = None,
    on_batch: BatchCallback | None = None,
) -> FitResult:
    """Train ``model`` on normalized ``train`` = (images [N,C,H,W] float, labels [N] int64).

    Every epoch appends a record (loss, acc, val_loss, val_acc, lr, seconds, and with
    ``diagnostics`` grad_norm/<layer> and zero_fraction/<layer>) to the history, then calls
    ``on_epoch_end`` with the state to continue from. Exceptions from the callback
    (KeyboardInterrupt, Optuna's TrialPruned) propagate: the state they saw is consistent.
    ``on_batch`` (a progress bar) sees every training batch; it changes no number.

    With ``parallel`` (one process of a torchrun job), ``batch_size`` is per process, the
    gradients are averaged by DistributedDataParallel and every record holds the metrics
    of all processes together; ``model`` and the state stay unwrapped.

    ``device`` defaults to the train images'; the tensors are moved there (once) and the
    model and optimizer must be there already. fp16 (CUDA) trains with a GradScaler.
    """
    keep_freed_memory()
    device = device or train[0].device
    images, labels = (t.to(device) for t in train)
    val_images, val_labels = (t.to(device) for t in val)
    stopper = EarlyStopping(early_stop)
    shuffle = torch.Generator().manual_seed(seed)  # on the CPU: the same order everywhere
    # fp16 runs on CUDA only (devices.check_precision); the scaler takes the device's type.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = start or LoopState()
    if start is None:
        torch.manual_seed(seed)  # dropout masks (CUDA's too); model init is seeded by the caller
    else:
        _restore(model, optimizer, schedule, stopper, shuffle, state, scaler, device)
    history = list(state.history)
    best_model = state.best_model
    forward = model if parallel is None else parallel.wrap(model)  # what trains
    started = time.perf_counter()
    stop_reason: StopReason = "max_epochs"

    for epoch in range(state.epochs_done, epochs):
        if stopper.should_stop:
            stop_reason = "early_stop"
            break
        tic = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        record, finite = _train_one_epoch(
            model,
            optimizer,
            schedule,
            images,
            labels,
            shuffle,
            batch_size,
            precision,
            diagnostics,
            forward=forward,
            parallel=parallel,
            scaler=scaler,
            on_batch=None if on_batch is None else functools.partial(on_batch, epoch),
        )
        if not finite:
            stop_reason = "diverged"
            break
        if parallel is None:
            logits = evaluate_logits(model, val_images, eval_batch_size, precision, device)
            record["val_loss"], record["val_acc"] = loss_and_accuracy_of_logits(logits, val_labels)
        else:
            record["val_loss"], record["val_acc"] = parallel.evaluate(
                model, val_images, val_labels, eval_batch_size, precision
            )
        record.update(lr=lr, seconds=time.perf_counter() - tic)
        if not math.isfinite(record["val_loss"]):
            history.append({"epoch": float(epoch), **record})
            stop_reason = "diverged"
            break
        history.append({"epoch": float(epoch), **record})
        if stopper.update(epoch, record) and early_stop.restore_best:
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        schedule.after_epoch(record)
        state = LoopState(
            epochs_done=epoch + 1,
            history=history,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            early_stopping=stopper.state_dict(),
            best_model=best_model,
            shuffle_rng=shuffle.get_state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            grad_scaler=scaler.state_dict() if scaler is not None else None,
        )
        if on_epoch_end is not None:
            on_epoch_end(state)
    else:
        if stopper.should_stop and len(history) > 0:
            stop_reason = "early_stop"

    if early_stop.restore_best and best_model is not None and stop_reason != "diverged":
        model.load_state_dict(best_model)
    return FitResult(
        history=history,
        epochs_run=len(history),
        stop_reason=stop_reason,
        best_epoch=stopper.best_epoch,
        train_seconds=time.perf_counter() - started,
    )


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    stopper: EarlyStopping,
    shuffle: torch.Generator,
    state: LoopState,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> None:
    """Continue from ``state``; its tensors may come from another device (a checkpoint
    written on a GPU resumes on the CPU): load_state_dict copies them onto the model's and
    the optimizer's parameters' device."""
    assert state.model is not None and state.optimizer is not None
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if state.schedule is not None:
        schedule.load_state_dict(state.schedule)
    if state.early_stopping is not None:
        stopper.load_state_dict(state.early_stopping)
    if state.shuffle_rng is not None:
        shuffle.set_state(state.shuffle_rng)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng, device)
    if scaler is not None and state.grad_scaler is not None:
        scaler.load_state_dict(state.grad_scaler)


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    images: torch.Tensor,
    labels: torch.Tensor,
    shuffle: torch.Generator,
    batch_size: int,
    precision: str,
    diagnostics: bool,
    *,
    forward: nn.Module,
    parallel: DataParallel | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: Callable[[int, int, Callable[[], float]], None] | None = None,
) -> tuple[dict[str, float], bool]:
    """One pass over a fresh permutation; returns the epoch's metrics and finiteness.

    loss and acc are averages over the epoch's batches as the weights move (as Keras
    reports them), accumulated as tensors so the hot loop never syncs on .item().
    ``forward`` is the module that trains: ``model`` itself or its DDP wrapper. The images
    and labels are on the training device; so are the permutation (moved once) and the sums.
    """
    forward.train()
    count = len(images)
    step = batch_size * (parallel.world_size if parallel is not None else 1)  # global batch
    seen = 0  # samples this process trained on
    device = images.device
    order = torch.randperm(count, generator=shuffle).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    measured = EpochDiagnostics(model) if diagnostics else None
    batches = 0
    total = len(range(0, count, step))

    def running_loss() -> float:  # this process's batches so far; one sync
        return float(loss_sum / max(seen, 1))

    with measured.watching_activations() if measured is not None else nullcontext():
        for begin in range(0, count, step):
            interrupts.raise_if_swallowed()  # one Python dropped inside a finalizer
            index = order[begin : begin + step]
            loss_weight = 1.0
            if parallel is not None:
                shard = parallel.shard(index)
                if shard is None:
                    break
                index, loss_weight = shard
            batch_images, batch_labels = images[index], labels[index]
            with devices.autocast(device, precision):
                logits = forward(batch_images)  # [B, classes]
                loss = nn.functional.cross_entropy(logits.float(), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            weighted = loss if loss_weight == 1.0 else loss * loss_weight
            if scaler is None:
                weighted.backward()  # type: ignore[no-untyped-call]
                if measured is not None:
                    measured.after_backward()
                optimizer.step()
            else:
                scaler.scale(weighted).backward()  # type: ignore[no-untyped-call]
                if measured is not None:
                    scaler.unscale_(optimizer)  # the norms of the true gradients
                    measured.after_backward()
                scaler.step(optimizer)  # skipped when a gradient is inf/NaN
                scaler.update()
            schedule.after_batch()
            loss_sum += loss.detach() * len(index)
            correct += (logits.detach().argmax(dim=1) == batch_labels).sum()
            batches += 1
            seen += len(index)
            if on_batch is not None:
                on_batch(batches, total, running_loss)
    if parallel is not None:
        totals = torch.tensor(seen, device=device)
        parallel.all_reduce_sum(loss_sum, correct, totals)
        seen = int(totals)
    mean_loss = (loss_sum / seen).item()
    record = {"loss": mean_loss, "acc": correct.item() / seen}
    if measured is not None:
        record.update(measured.record(batches))
    return record, math.isfinite(mean_loss)
