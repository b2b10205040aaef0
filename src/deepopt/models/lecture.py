"""The lecture's networks, ``LectureCNN`` and ``MLP``, and where BatchNorm and the
activation (ReLU, sigmoid, tanh) sit in every hidden block."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from deepopt.errors import ConfigError
from deepopt.models.layout import LayoutConv2d, NCHWFlatten

__all__ = [
    "ACTIVATION_TYPES",
    "MLP",
    "LectureCNN",
    "hidden_block",
    "new_activation",
    "new_batchnorm",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
ACTIVATION_TYPES = tuple(_ACTIVATIONS.values())

# The lecture's 5x5 kernels; padding 2 is 'same' for stride 1 and gives Keras' 'same'
# output size ceil(n / 2) for stride 2. (Keras pads a stride-2 'same' conv of an even
# input asymmetrically, 1 before and 2 after; torch pads 2 on both sides and never uses
# the last padded row, so the sampling grid is shifted by one pixel but sizes agree.)
_KERNEL = 5
_PADDING = 2


def new_activation(name: str) -> nn.Module:
    """A new activation module: every hidden layer gets its own, so a forward hook can
    measure it alone (ReLU sparsity)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        allowed = ", ".join(sorted(_ACTIVATIONS))
        raise ConfigError(f"model.activation: {name!r} is not one of {allowed}") from None


def new_batchnorm(features: int, *, spatial: bool, momentum: float, eps: float) -> nn.Module:
    """BatchNorm over ``features`` channels (``spatial``: of [B, C, H, W] maps) or units.

    ``momentum`` is PyTorch's, the new batch's weight in the running statistics (Keras'
    0.99 is 0.01 here); ``eps`` is added to the batch variance. One difference stays:
    torch's running variance averages the unbiased batch variance (n / (n - 1) times
    Keras', n the values per channel in a batch: 50 for the dense layer's batches of 50,
    thousands for a convolution's), which only changes eval mode.
    """
    norm = nn.BatchNorm2d if spatial else nn.BatchNorm1d
    return norm(features, eps=eps, momentum=momentum)


def hidden_block(
    index: int,
    kind: str,
    layer: nn.Module,
    norm: nn.Module | None,
    activation: str,
    dropout: float,
) -> list[tuple[str, nn.Module]]:
    """``kind{index}`` [-> ``bn{index}``] -> ``act{index}`` [-> ``drop{index}``].

    With batchnorm the layer has no bias (the batchnorm shift replaces it, as the lecture
    says) and BatchNorm comes before the activation; without, the layer has a bias and goes
    straight into the activation. ``index`` is the hidden layer's depth (1 = nearest the
    input), so per-layer gradient norms and ReLU sparsity read as "conv1 ... dense4".
    """
    block: list[tuple[str, nn.Module]] = [(f"{kind}{index}", layer)]
    if norm is not None:
        block.append((f"bn{index}", norm))
    block.append((f"act{index}", new_activation(activation)))
    if dropout > 0.0:
        block.append((f"drop{index}", nn.Dropout(dropout)))
    return block


def _same_size(size: int, stride: int) -> int:
    """Output length of a 5x5 conv with padding 2: Keras' 'same' size ceil(size / stride)."""
    return (size + 2 * _PADDING - _KERNEL) // stride + 1


class LectureCNN(nn.Sequential):
    """The lecture's Keras ``build_nn`` (Conv-Conv-Conv-Dense-Dense), returning logits.

    Three 5x5 convolutions (stride 2, 2, 1, padding 'same'), a hidden dense layer and the
    output layer, which always has a bias and returns logits: the softmax lives in the loss
    (``F.cross_entropy``). Each hidden layer is a ``hidden_block``.

    Shapes for a [B, 1, 28, 28] input and the lecture's channels (10, 40, 80), 50 units:
    conv1 [B, 10, 14, 14] -> conv2 [B, 40, 7, 7] -> conv3 [B, 80, 7, 7]
    -> flatten [B, 3920] -> dense4 [B, 50] -> logits [B, 10].
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        conv_channels: tuple[int, int, int],
        dense_units: int,
        num_classes: int,
        batchnorm: bool,
        bn_momentum: float,
        bn_eps: float,
        activation: str,
        dropout: float,
    ) -> None:
        in_channels, height, width = image_shape
        layers: list[tuple[str, nn.Module]] = []
        previous = in_channels
        for index, (channels, stride) in enumerate(zip(conv_channels, (2, 2, 1), strict=True), 1):
            # [B, previous, h, w] -> [B, channels, ceil(h / stride), ceil(w / stride)]
            conv = LayoutConv2d(
                previous, channels, _KERNEL, stride=stride, padding=_PADDING, bias=not batchnorm
            )
            norm = (
                new_batchnorm(channels, spatial=True, momentum=bn_momentum, eps=bn_eps)
                if batchnorm
                else None
            )
            layers += hidden_block(index, "conv", conv, norm, activation, dropout)
            height, width = _same_size(height, stride), _same_size(width, stride)
            previous = channels
        layers.append(("flatten", NCHWFlatten()))  # [B, c3, h, w] -> [B, c3 * h * w]
        flat = previous * height * width
        dense = nn.Linear(flat, dense_units, bias=not batchnorm)  # [B, flat] -> [B, units]
        norm = (
            new_batchnorm(dense_units, spatial=False, momentum=bn_momentum, eps=bn_eps)
            if batchnorm
            else None
        )
        layers += hidden_block(len(conv_channels) + 1, "dense", dense, norm, activation, dropout)
        layers.append(("logits", nn.Linear(dense_units, num_classes)))  # -> [B, num_classes]
        super().__init__(OrderedDict(layers))
        self.feature_shape = (previous, height, width)  # conv3's output per image


class MLP(nn.Sequential):
    """``depth`` dense layers of ``width`` units on the flattened image, then logits: a
    plain stack of equal width for the vanishing-gradient study.

    Shapes: [B, C, H, W] -> flatten [B, C*H*W] -> dense1..dense{depth} [B, width]
    -> logits [B, num_classes].
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        depth: int,
        width: int,
        num_classes: int,
        batchnorm: bool,
        bn_momentum: float,
        bn_eps: float,
        activation: str,
        dropout: float,
    ) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        previous = math.prod(image_shape)
        for index in range(1, depth + 1):
            dense = nn.Linear(previous, width, bias=not batchnorm)  # [B, previous] -> [B, width]
            norm = (
                new_batchnorm(width, spatial=False, momentum=bn_momentum, eps=bn_eps)
                if batchnorm
                else None
            )
            layers += hidden_block(index, "dense", dense, norm, activation, dropout)
            previous = width
        layers.append(("logits", nn.Linear(previous, num_classes)))  # -> [B, num_classes]
        super().__init__(OrderedDict(layers))
