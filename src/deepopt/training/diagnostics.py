"""The lecture's diagnostics, measured while training: per-layer gradient norms (vanishing
gradients) and the fraction of exactly-zero ReLU outputs per layer (sparsity)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from deepopt.models import weight_layers

__all__ = ["EpochDiagnostics"]


class EpochDiagnostics:
    """Sums over one epoch's batches: the gradient norm of every Conv/Linear weight after
    each backward pass, and the zero fraction of every ReLU's output; ``record`` gives their
    per-batch means as ``grad_norm/<layer>`` and ``zero_fraction/<layer>``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Conv2d and Linear modules, so each weight is a Parameter (typed Tensor | Module).
        self.weights: list[tuple[str, torch.Tensor]] = [
            (name, cast(torch.Tensor, module.weight)) for name, module in weight_layers(model)
        ]
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.zero_sums: dict[str, torch.Tensor] = {}

    @contextmanager
    def watching_activations(self) -> Iterator[None]:
        """Forward hooks on every ReLU while the epoch runs, removed afterwards."""
        handles = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ReLU):

                def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: str = name) -> None:
                    fraction = (out.detach() == 0).float().mean()
                    self.zero_sums[key] = (
                        self.zero_sums.get(key, torch.zeros((), device=fraction.device)) + fraction
                    )

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def after_backward(self) -> None:
        for name, weight in self.weights:
            if weight.grad is not None:
                norm = weight.grad.norm()  # on the weight's device: no sync per batch
                self.grad_sums[name] = (
                    self.grad_sums.get(name, torch.zeros((), device=norm.device)) + norm
                )

    def record(self, batches: int) -> dict[str, float]:
        record = {
            f"grad_norm/{name}": total.item() / batches for name, total in self.grad_sums.items()
        }
        for name, total in self.zero_sums.items():
            record[f"zero_fraction/{name}"] = total.item() / batches
        return record
