"""Finding the layers of any network (deepopt's or torchvision's): its weight layers, its
classification head, its activations."""

from __future__ import annotations

from torch import nn

from deepopt.errors import DataError
from deepopt.models.lecture import ACTIVATION_TYPES

__all__ = ["activation_layers", "head_name", "out_features", "weight_layers"]


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear layers in forward order (registration order in our Sequentials)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]


def head_name(model: nn.Module) -> str:
    """The classification layer: the last Conv/Linear (``logits`` in deepopt's networks;
    torchvision's ``fc``/``classifier.*``). Registration order is forward order in all of
    them."""
    layers = weight_layers(model)
    if not layers:
        raise DataError(f"{type(model).__name__} has no Conv2d/Linear layer to use as its head")
    return layers[-1][0]


def out_features(model: nn.Module) -> int:
    """The number of classes the head gives."""
    head = model.get_submodule(head_name(model))
    return int(head.out_features if isinstance(head, nn.Linear) else head.out_channels)  # type: ignore[arg-type]


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules (one per hidden layer) in forward order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, ACTIVATION_TYPES)
    ]
