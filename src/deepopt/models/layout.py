"""The memory-layout decision (NCHW or channels_last) for training, saving and evaluation,
and the layout-aware layers that let one network mix both."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "LayoutConv2d",
    "NCHWFlatten",
    "evaluation_layout",
    "memory_format_of",
    "set_portable_layout",
    "set_training_layout",
]

_NHWC = torch.channels_last


class _Relayout(torch.autograd.Function):
    """``x`` copied to ``memory_format``, with a backward that returns the gradient in
    ``x``'s own layout. Autograd's copy returns it in the copy's layout instead, and the
    backward of the layer before (a ReLU) then combines two layouts in a slow elementwise
    path (measured: see README, Performance; benchmarks/results/training-layout.md)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.source_format = memory_format_of(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.source_format), None


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last only for a 4-d tensor that is not also plain contiguous (with one
    channel, or one pixel, a tensor is both)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=_NHWC):
        return _NHWC
    return torch.contiguous_format


class LayoutConv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes an NCHW input to channels_last when its weight is
    channels_last (``set_training_layout``), its gradient going back in NCHW (conv2 after
    the NCHW conv1 block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if memory_format_of(self.weight) == _NHWC and memory_format_of(x) != _NHWC:
            x = _Relayout.apply(x, _NHWC)
        return super().forward(x)


class NCHWFlatten(nn.Flatten):
    """``nn.Flatten`` in NCHW order for an input in either layout (the Linear layer after
    it reads the features as channel, row, column); a channels_last input's gradient goes
    back in channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if memory_format_of(x) == _NHWC:
            x = _Relayout.apply(x, torch.contiguous_format)
        return super().forward(x)


def set_training_layout(
    model: nn.Module, precision: str, device: torch.device | None = None
) -> None:
    """Lay out ``model``'s weights for the fastest training at ``precision`` on ``device``
    (default the CPU), in place.

    Only a network built of ``LayoutConv2d`` (the lecture CNN) in fp32 changes: its
    convolutions after the first go to channels_last, where oneDNN's convolution gradients
    are faster; conv1 (one input channel), bf16 and the other networks were slower in
    channels_last and stay NCHW (measured: see README, Performance;
    benchmarks/results/training-layout.md). Call it before building the optimizer, whose
    state then takes the same layout; outputs agree with NCHW within float rounding.
    ``set_portable_layout`` undoes it.

    On CUDA and MPS nothing changes (NCHW) until measured there: benchmarks/gpu_check.sh
    times the layouts on a GPU; the decision above is the CPU's (oneDNN's) only.
    """
    if device is not None and device.type != "cpu":
        return
    if precision != "fp32":
        return
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions or not all(isinstance(m, LayoutConv2d) for m in convolutions):
        return
    for convolution in convolutions[1:]:
        convolution.to(memory_format=_NHWC)


def set_portable_layout(model: nn.Module) -> None:
    """Back to NCHW, in place, after training: the saved, logged and exported weights
    (torch.export's pt2 archive expects contiguous ones) are the same bytes whichever
    layout trained them."""
    model.to(memory_format=torch.contiguous_format)


def evaluation_layout(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``model`` (in place) and ``images`` [N, C, H, W] in channels_last for inference:
    oneDNN's fp32 and bf16 convolutions are faster there, with the same predictions
    (logits within float rounding; measured: see README, Performance;
    benchmarks/results/training-layout.md). On CUDA and MPS (``images``' device) both stay
    NCHW until measured there (benchmarks/gpu_check.sh)."""
    if images.device.type != "cpu":
        return model, images
    return model.to(memory_format=_NHWC), images.contiguous(memory_format=_NHWC)
