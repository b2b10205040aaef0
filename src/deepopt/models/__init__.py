"""deepopt's networks as plain ``nn.Module``s built from ``ModelConfig``: the lecture's
(``lecture``), ResNet (``resnet``), torchvision's (``torchvision``); weight files in
``weights``, the memory layout in ``layout``.

Layer names are ``conv{i}``/``dense{i}``, ``bn{i}``, ``act{i}``, ``drop{i}`` where ``i`` is
the hidden layer's depth (1 = nearest the input), and ``logits`` for the output layer.
"""

from __future__ import annotations

from deepopt.models.build import build_model
from deepopt.models.layers import activation_layers, head_name, weight_layers
from deepopt.models.layout import evaluation_layout, set_portable_layout, set_training_layout
from deepopt.models.lecture import MLP, LectureCNN
from deepopt.models.resnet import ResidualBlock, ResNet
from deepopt.models.torchvision import adapt_stem, replace_head
from deepopt.models.weights import (
    HUB_TIMEOUT_S,
    fetch_hub_file,
    hub_state_dict,
    load_state,
    load_weights_file,
    read_state_dict,
)

__all__ = [
    "HUB_TIMEOUT_S",
    "MLP",
    "LectureCNN",
    "ResNet",
    "ResidualBlock",
    "activation_layers",
    "adapt_stem",
    "build_model",
    "evaluation_layout",
    "fetch_hub_file",
    "head_name",
    "hub_state_dict",
    "load_state",
    "load_weights_file",
    "read_state_dict",
    "replace_head",
    "set_portable_layout",
    "set_training_layout",
    "weight_layers",
]
