"""The machine's matmul peak and the model's FLOPs per image (compute efficiency =
the FLOPs of an epoch per second, over the fp32 peak)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from deepopt.config import ModelConfig
from deepopt.data import NUM_CLASSES
from deepopt.models import build_model


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of one [size, size] @ [size, size] matmul."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.mm(a, b)  # warm-up: allocation and kernel selection
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best / 1e9


def model_flops(model_config: ModelConfig, image_shape: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs per image of a training step (forward + backward) and of an inference pass."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 50
    model = build_model(model_config, image_shape=image_shape)
    images = torch.randn(batch, *image_shape)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    with FlopCounterMode(display=False) as train_counter:
        nn.functional.cross_entropy(model(images), labels).backward()  # type: ignore[no-untyped-call]
    model.eval()
    with FlopCounterMode(display=False) as forward_counter, torch.inference_mode():
        model(images)
    return {
        "train_step": train_counter.get_total_flops() / batch,
        "forward": forward_counter.get_total_flops() / batch,
    }


def epoch_flops(flops: dict[str, float], train_count: int, val_count: int) -> float:
    return flops["train_step"] * train_count + flops["forward"] * val_count
