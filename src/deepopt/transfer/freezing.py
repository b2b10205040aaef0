"""The pretrained start of a fine-tune: load the backbone, freeze it (BatchNorm included)
for a linear probe, and the optimizer's param groups of each mode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepopt.errors import ConfigError
from deepopt.models import head_name

__all__ = ["FrozenBatchNorm", "freeze_backbone", "load_backbone", "param_groups"]


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer that always normalizes with its stored statistics and scale and
    learns nothing: what a frozen backbone's BatchNorm must do even in training mode.

    Its buffers carry the same names as BatchNorm's parameters and buffers, so its state
    dict loads into the plain network (and back).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if norm.running_mean is None or norm.running_var is None:
            raise ConfigError("a BatchNorm layer without running statistics cannot be frozen")
        self.eps = norm.eps
        self.weight: torch.Tensor | None
        self.bias: torch.Tensor | None
        for name in ("weight", "bias"):
            value = getattr(norm, name)
            self.register_buffer(name, None if value is None else value.detach().clone())
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        tracked = norm.num_batches_tracked
        self.register_buffer("num_batches_tracked", None if tracked is None else tracked.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C] or [B, C, H, W], per-channel (x - mean) / sqrt(var + eps) * weight + bias
        return nn.functional.batch_norm(
            x,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the head, in place; the head's parameters."""
    head = head_name(model)
    norms = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not (name == head or name.startswith(f"{head}."))
    ]
    for name, module in norms:
        model.set_submodule(name, FrozenBatchNorm(module))
    trainable = _head_parameters(model)
    keep = {id(p) for p in trainable}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return trainable


def param_groups(
    model: nn.Module, mode: str, lr: float, backbone_lr_scale: float
) -> list[dict[str, Any]]:
    """The optimizer's param groups of a fine-tune in ``mode``, head first (the history's
    lr is the head's). linear_probe freezes the backbone in place."""
    if mode == "linear_probe":
        return [{"params": freeze_backbone(model)}]
    head = _head_parameters(model)
    ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in ids]
    if mode == "finetune":
        return [{"params": head}, {"params": backbone, "lr": lr * backbone_lr_scale}]
    if mode == "scratch":
        return [{"params": head}, {"params": backbone}]
    raise ConfigError(f"transfer.modes: {mode!r} is not one of linear_probe, finetune, scratch")


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the pretrained ``state`` into every layer but the head (left as initialised)."""
    prefix = f"{head_name(model)}."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing = sorted(own.keys() - body.keys())
    unexpected = sorted(body.keys() - own.keys())
    wrong = [k for k in own.keys() & body.keys() if own[k].shape != body[k].shape]
    if missing or unexpected or wrong:
        problem = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} has shape {list(body[wrong[0]].shape)}, the network's "
            f"{list(own[wrong[0]].shape)}"
        )
        raise ConfigError(
            f"{source}: the pretrained weights do not fit the network of transfer.overrides "
            f"({problem}); run the pretrain stage again"
        )
    model.load_state_dict(body, strict=False)
