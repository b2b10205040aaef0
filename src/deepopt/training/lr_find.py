"""Leslie Smith's learning-rate range test as fastai's ``Learner.lr_find`` runs it.

Smith (2017), "Cyclical Learning Rates for Training Neural Networks", section 3.3: train
a few batches while the learning rate grows, and read a good rate off the loss curve.
What follows fastai (fastai/callback/schedule.py: ``LRFinder``, ``lr_find``, ``valley``;
the smoothing is fastai/learner.py's ``AvgSmoothLoss``, which its ``Recorder`` records):

* batch ``i`` (from 0) trains at ``start_lr * (end_lr / start_lr) ** (i / num_iter)``
  (``SchedExp`` at ``train_iter / num_it``), ``num_iter`` batches at most;
* the recorded loss is smoothed: ``avg = beta avg + (1 - beta) loss`` with beta 0.98,
  divided by ``1 - beta ** count`` (its bias towards the start value 0 removed);
* with ``stop_div`` the test stops after the batch whose smoothed loss exceeds 4x the best
  smoothed loss so far (that batch is recorded, as fastai records before it checks);
* the model and the optimizer are put back as they were (fastai saves and loads both);
* the suggestion skips the first ``num_iter // 10`` and the last 5 recorded points and
  takes ``valley`` of the rest: the longest decreasing stretch, and a point 1/3 + 1/6 of
  the way along it (ESRI's "valley" rule, fastai's default ``SuggestionMethod.Valley``).

Where this differs: a non-finite loss ends the test at once and is not recorded (fastai
records NaN and trains on, then drops the curve from its first NaN before suggesting;
``suggestion_index`` keeps the same points); fastai's ``num_it < 6`` is raised to 6, here the config
refuses it; ``valley`` runs in O(n log n) instead of fastai's O(n^2) double loop (the same
index: tests/training/test_lr_find.py checks it against fastai's loop), and its index is
kept >= 0 (fastai's can be -1, its last point, when the longest stretch is the first two).

Batches are the training loop's: slices of a seeded permutation of the training split,
a new permutation when one is used up. Nothing here does I/O or tracking.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deepopt import devices, interrupts

__all__ = [
    "DIVERGENCE_FACTOR",
    "SMOOTHING",
    "RangeTest",
    "StopReason",
    "lr_at",
    "lr_range_test",
    "suggestion_index",
    "valley",
]

SMOOTHING = 0.98  # fastai's AvgSmoothLoss beta: about the last 50 batches
DIVERGENCE_FACTOR = 4.0  # fastai's stop_div: smoothed loss > 4 x the best so far
_SKIP_END = 5  # points fastai's lr_find leaves out at the end before suggesting

StopReason = Literal["num_iter", "diverged", "non_finite"]


@dataclass(frozen=True)
class RangeTest:
    lrs: list[float]  # the learning rate of each batch
    losses: list[float]  # the smoothed loss after each batch (fastai's recorded losses)
    suggestion: float | None  # None: too few points to suggest from
    suggestion_step: int | None  # the batch (index into lrs and losses) suggested
    stop_reason: StopReason


def lr_at(step: int, *, start_lr: float, end_lr: float, num_iter: int) -> float:
    """The rate of batch ``step`` (from 0): fastai's SchedExp at ``step / num_iter``."""
    return float(start_lr * (end_lr / start_lr) ** (step / num_iter))


def valley(losses: Sequence[float]) -> int:
    """The index fastai's ``valley`` suggests for ``losses`` (at least one point).

    ``lds[i]`` is the length of the longest strictly decreasing subsequence ending at ``i``;
    the valley ends at the first ``i`` with the largest ``lds``, starts ``lds`` points
    before it, and the suggestion lies 1/3 + 1/6 of its length in. fastai computes ``lds``
    with a double loop; the same lengths come from patience sorting on the negated losses
    (the smallest last value of an increasing run of each length, kept sorted).
    """
    if not losses:
        raise ValueError("valley needs at least one loss")
    tails: list[float] = []  # tails[k]: the smallest end of an increasing run of k + 1 points
    max_end, longest = 0, 0
    for i, loss in enumerate(losses):
        value = -loss  # decreasing losses are increasing values
        k = bisect.bisect_left(tails, value)
        if k == len(tails):
            tails.append(value)
        else:
            tails[k] = value
        if k + 1 > longest:  # strictly longer: the first end of the longest, as fastai's
            max_end, longest = i, k + 1
    max_start = max_end - longest
    sections = (max_end - max_start) / 3
    return max(0, max_start + int(sections) + int(sections / 2))


def suggestion_index(
    losses: Sequence[float], num_iter: int, *, ended_non_finite: bool = False
) -> int | None:
    """The recorded batch fastai's ``lr_find`` suggests: ``valley`` of the points left
    after skipping ``num_iter // 10`` at the start and 5 at the end; None if none are.

    fastai drops the last 5 of the points it recorded: all ``num_iter`` when a NaN came (it
    records NaN and trains on, then cuts the curve at the first NaN), the points up to the
    divergence otherwise; ``ended_non_finite`` says the curve here ended at a NaN/inf."""
    skip = num_iter // 10
    recorded = num_iter if ended_non_finite else len(losses)
    kept = losses[skip : min(len(losses), recorded - _SKIP_END)]
    return None if not kept else skip + valley(kept)


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    seed: int,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    stop_div: bool = True,
    precision: str = "fp32",
) -> RangeTest:
    """Train ``model`` with ``optimizer`` on ``train`` = (normalized images [N,C,H,W],
    labels [N]) for up to ``num_iter`` batches at exponentially growing rates, from
    ``start_lr`` towards ``end_lr``; return the curve and the suggested rate.

    Afterwards the model's weights, buffers and gradients, its train/eval mode, the
    optimizer's state and param groups and torch's global RNG are exactly as before: the
    caller trains the same network on from where it was (fastai only clears the gradients).
    The model and the tensors must be on one device.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, but got {start_lr=}, {end_lr=}")
    if num_iter < 1 or batch_size < 1:
        raise ValueError(f"need num_iter and batch_size >= 1, but got {num_iter=}, {batch_size=}")
    images, labels = train
    device = images.device
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    saved_rng = torch.get_rng_state()
    saved_cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    was_training = model.training
    try:
        torch.manual_seed(seed)  # dropout masks, as fit seeds them
        lrs, losses, stop_reason = _sweep(
            model,
            optimizer,
            images,
            labels,
            batch_size,
            seed,
            precision,
            start_lr=start_lr,
            end_lr=end_lr,
            num_iter=num_iter,
            stop_div=stop_div,
        )
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        for parameter, grad in zip(model.parameters(), saved_grads, strict=True):
            parameter.grad = grad  # the caller's, not the test's last batch's
        model.train(was_training)
        torch.set_rng_state(saved_rng)
        if saved_cuda_rng is not None:
            torch.cuda.set_rng_state(saved_cuda_rng, device)
    step = suggestion_index(losses, num_iter, ended_non_finite=stop_reason == "non_finite")
    return RangeTest(
        lrs=lrs,
        losses=losses,
        suggestion=None if step is None else lrs[step],
        suggestion_step=step,
        stop_reason=stop_reason,
    )


def _sweep(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    precision: str,
    *,
    start_lr: float,
    end_lr: float,
    num_iter: int,
    stop_div: bool,
) -> tuple[list[float], list[float], StopReason]:
    """The test's batches; reads each batch's loss (one sync per batch, as fastai)."""
    model.train()
    device = images.device
    shuffle = torch.Generator().manual_seed(seed)  # on the CPU, as the loop's
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    count = len(images)
    order = torch.randperm(count, generator=shuffle).to(device)
    begin = 0
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    for step in range(num_iter):
        interrupts.raise_if_swallowed()
        if begin >= count:  # a new pass over the data
            order, begin = torch.randperm(count, generator=shuffle).to(device), 0
        index = order[begin : begin + batch_size]
        begin += batch_size
        lr = lr_at(step, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with devices.autocast(device, precision):
            logits = model(images[index])  # [B, classes]
            loss = nn.functional.cross_entropy(logits.float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        else:
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
        value = float(loss.detach())
        if not math.isfinite(value):
            return lrs, losses, "non_finite"
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if stop_div and smoothed > DIVERGENCE_FACTOR * best:
            return lrs, losses, "diverged"
    return lrs, losses, "num_iter"
