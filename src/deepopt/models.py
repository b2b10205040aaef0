"""The lecture's networks as plain ``nn.Module``s: no I/O, built from ``ModelConfig``.

``LectureCNN`` is the lecture's Keras ``build_nn``: three 5x5 convolutions (stride 2, 2, 1,
padding 'same'), a hidden dense layer and a 10-way output. With batchnorm every hidden
Conv/Dense drops its bias (the batchnorm shift replaces it, as the lecture says) and is
followed by BatchNorm then the activation; without batchnorm it has a bias and goes
straight into the activation. The output layer always has a bias and returns logits: the
softmax lives in the loss (``F.cross_entropy``).

``MLP`` is a plain stack of dense layers of equal width for the vanishing-gradient study.

Layer names are ``conv{i}``/``dense{i}``, ``bn{i}``, ``act{i}``, ``drop{i}`` where ``i`` is
the hidden layer's depth (1 = nearest the input), and ``logits`` for the output layer, so
per-layer gradient norms and ReLU sparsity read as "conv1 ... dense4, logits". Every
hidden layer gets its own activation module so a forward hook can measure it alone.

``ResNet`` is a small residual network for 28x28 (or 32x32) images after He et al. (2016),
"Deep Residual Learning", section 4.2: a 3x3 stem convolution, three stages of ``n``
residual blocks (two 3x3 convolutions each) with ``base_channels``, twice and four times
as many channels, the second and third stage starting with stride 2, then global average
pooling and the logits: ``depth = 6 n + 2`` weight layers (8, 14, 20, ...). Its shortcuts are
the paper's option A, parameter-free: identity, or where a stage halves the size and
doubles the channels, every second pixel with the new channels zero. So ``skip: false``
(the "plain" network) has exactly the same layers and parameters, only the identity path
is gone, and the two differ in nothing but the skip connections.

``torchvision:<name>`` networks are built in ``deepopt.zoo`` (torchvision is imported only
for them).

Initialisation (``model.init``): ``keras`` (the default) is the lecture's, Keras' layer
defaults: Glorot-uniform weights and zero biases. ``torch`` keeps PyTorch's defaults
(Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), whose weights
are up to sqrt(3) times smaller: in a 10-layer ReLU MLP without batchnorm that alone
shrinks the gradient by about 3x per layer, which would blur the vanishing-gradient study.
BatchNorm starts at gamma=1, beta=0 in both.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from deepopt.config import ModelConfig, resnet_blocks
from deepopt.errors import ConfigError, DataError

__all__ = [
    "MLP",
    "LectureCNN",
    "ResNet",
    "ResidualBlock",
    "activation_layers",
    "build_model",
    "head_name",
    "set_training_layout",
    "weight_layers",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
_ACTIVATION_TYPES = tuple(_ACTIVATIONS.values())

# The lecture's 5x5 kernels; padding 2 is 'same' for stride 1 and gives Keras' 'same'
# output size ceil(n / 2) for stride 2. (Keras pads a stride-2 'same' conv of an even
# input asymmetrically, 1 before and 2 after; torch pads 2 on both sides and never uses
# the last padded row, so the sampling grid is shifted by one pixel but sizes agree.)
_KERNEL = 5
_PADDING = 2


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        allowed = ", ".join(sorted(_ACTIVATIONS))
        raise ConfigError(f"model.activation: {name!r} is not one of {allowed}") from None


def _hidden_block(
    index: int,
    kind: str,
    layer: nn.Module,
    norm: nn.Module | None,
    activation: str,
    dropout: float,
) -> list[tuple[str, nn.Module]]:
    """``kind{index}`` [-> ``bn{index}``] -> ``act{index}`` [-> ``drop{index}``]."""
    block: list[tuple[str, nn.Module]] = [(f"{kind}{index}", layer)]
    if norm is not None:
        block.append((f"bn{index}", norm))
    block.append((f"act{index}", _activation(activation)))
    if dropout > 0.0:
        block.append((f"drop{index}", nn.Dropout(dropout)))
    return block


def _same_size(size: int, stride: int) -> int:
    """Output length of a 5x5 conv with padding 2: Keras' 'same' size ceil(size / stride)."""
    return (size + 2 * _PADDING - _KERNEL) // stride + 1


_NHWC = torch.channels_last


class _Relayout(torch.autograd.Function):
    """``x`` copied to ``memory_format``, with a backward that returns the gradient in
    ``x``'s own layout. Autograd's copy returns it in the copy's layout instead, and the
    backward of the layer before (a ReLU) then combines two layouts in a slow elementwise
    path: for the lecture CNN, 0.7 ms a batch after conv3 instead of 0.03 ms."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.source_format = _memory_format(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.source_format), None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last only for a 4-d tensor that is not also plain contiguous (with one
    channel, or one pixel, a tensor is both)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=_NHWC):
        return _NHWC
    return torch.contiguous_format


class _LayoutConv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes an NCHW input to channels_last when its weight is
    channels_last (``set_training_layout``), its gradient going back in NCHW (conv2 after
    the NCHW conv1 block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _memory_format(self.weight) == _NHWC and _memory_format(x) != _NHWC:
            x = _Relayout.apply(x, _NHWC)
        return super().forward(x)


class _NCHWFlatten(nn.Flatten):
    """``nn.Flatten`` in NCHW order for an input in either layout (the Linear layer after
    it reads the features as channel, row, column); a channels_last input's gradient goes
    back in channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _memory_format(x) == _NHWC:
            x = _Relayout.apply(x, torch.contiguous_format)
        return super().forward(x)


class LectureCNN(nn.Sequential):
    """The lecture's ``build_nn`` (Conv-Conv-Conv-Dense-Dense), returning logits.

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
        activation: str,
        dropout: float,
    ) -> None:
        in_channels, height, width = image_shape
        layers: list[tuple[str, nn.Module]] = []
        previous = in_channels
        for index, (channels, stride) in enumerate(zip(conv_channels, (2, 2, 1), strict=True), 1):
            # [B, previous, h, w] -> [B, channels, ceil(h / stride), ceil(w / stride)]
            conv = _LayoutConv2d(
                previous, channels, _KERNEL, stride=stride, padding=_PADDING, bias=not batchnorm
            )
            norm: nn.Module | None = nn.BatchNorm2d(channels) if batchnorm else None
            layers += _hidden_block(index, "conv", conv, norm, activation, dropout)
            height, width = _same_size(height, stride), _same_size(width, stride)
            previous = channels
        layers.append(("flatten", _NCHWFlatten()))  # [B, c3, h, w] -> [B, c3 * h * w]
        flat = previous * height * width
        dense = nn.Linear(flat, dense_units, bias=not batchnorm)  # [B, flat] -> [B, units]
        norm = nn.BatchNorm1d(dense_units) if batchnorm else None
        layers += _hidden_block(len(conv_channels) + 1, "dense", dense, norm, activation, dropout)
        layers.append(("logits", nn.Linear(dense_units, num_classes)))  # -> [B, num_classes]
        super().__init__(OrderedDict(layers))
        self.feature_shape = (previous, height, width)  # conv3's output per image


class MLP(nn.Sequential):
    """``depth`` dense layers of ``width`` units on the flattened image, then logits.

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
        activation: str,
        dropout: float,
    ) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        previous = math.prod(image_shape)
        for index in range(1, depth + 1):
            dense = nn.Linear(previous, width, bias=not batchnorm)  # [B, previous] -> [B, width]
            norm = nn.BatchNorm1d(width) if batchnorm else None
            layers += _hidden_block(index, "dense", dense, norm, activation, dropout)
            previous = width
        layers.append(("logits", nn.Linear(previous, num_classes)))  # -> [B, num_classes]
        super().__init__(OrderedDict(layers))


class _Shortcut(nn.Module):
    """He et al.'s option A: identity, or every second pixel with zero channels appended
    where a block halves the size and widens: [B, c_in, h, w] -> [B, c_out, ceil(h/s), ...]."""

    def __init__(self, stride: int, added_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.added_channels = added_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # the 3x3/stride-2 conv's output grid
        if self.added_channels:
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.added_channels))  # zero channels
        return x


class ResidualBlock(nn.Module):
    """conv1 -> bn1 -> act1 -> conv2 -> bn2 -> (+ shortcut) -> act2, 3x3 convolutions.

    Without ``skip`` the block has no shortcut at all: a plain two-layer stack.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        *,
        skip: bool,
        batchnorm: bool,
        activation: str,
    ) -> None:
        super().__init__()
        # [B, in, h, w] -> [B, channels, ceil(h / stride), ceil(w / stride)]
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.shortcut = _Shortcut(stride, channels - in_channels) if skip else None
        self.act2 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)  # type: ignore[no-any-return]


class ResNet(nn.Sequential):
    """He et al.'s CIFAR ResNet with ``blocks`` residual blocks per stage, returning logits.

    Shapes for a [B, 1, 28, 28] input and base_channels 16: conv0 [B, 16, 28, 28]
    -> stage1 [B, 16, 28, 28] -> stage2 [B, 32, 14, 14] -> stage3 [B, 64, 7, 7]
    -> pool [B, 64, 1, 1] -> flatten [B, 64] -> logits [B, num_classes]. (32x32: 32, 16, 8.)
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        blocks: int,
        base_channels: int,
        num_classes: int,
        skip: bool,
        batchnorm: bool,
        activation: str,
        dropout: float,
    ) -> None:
        in_channels = image_shape[0]
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=not batchnorm)),
        ]
        if batchnorm:
            layers.append(("bn0", nn.BatchNorm2d(base_channels)))
        layers.append(("act0", _activation(activation)))
        previous = base_channels
        for stage in range(1, 4):
            channels = base_channels * 2 ** (stage - 1)
            stage_blocks: OrderedDict[str, nn.Module] = OrderedDict(
                (
                    f"block{index}",
                    ResidualBlock(
                        previous if index == 1 else channels,
                        channels,
                        2 if stage > 1 and index == 1 else 1,
                        skip=skip,
                        batchnorm=batchnorm,
                        activation=activation,
                    ),
                )
                for index in range(1, blocks + 1)
            )
            layers.append((f"stage{stage}", nn.Sequential(stage_blocks)))
            previous = channels
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        if dropout > 0.0:
            layers.append(("drop", nn.Dropout(dropout)))
        layers.append(("logits", nn.Linear(previous, num_classes)))  # -> [B, num_classes]
        super().__init__(OrderedDict(layers))


def build_model(
    cfg: ModelConfig,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    load_weights: bool = True,
) -> nn.Module:
    """The network named by ``cfg.name`` for images of ``image_shape`` = (C, H, W).

    With ``load_weights`` (training) the network starts from ``cfg.weights`` when set;
    without (rebuilding a trained network whose state dict follows) it is never read.
    """
    if len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape):
        raise DataError(
            f"image shape {tuple(image_shape)} must be (channels, height, width) of positive ints"
        )
    if num_classes < 2:
        raise DataError(f"num_classes {num_classes} must be at least 2")
    if cfg.name.startswith("torchvision:"):
        from deepopt.zoo import build  # lazy: imports torchvision

        return build(cfg, image_shape, num_classes, load_weights=load_weights)
    model = _build(cfg, image_shape, num_classes)
    if cfg.init == "keras":
        for _, layer in weight_layers(model):
            assert isinstance(layer, nn.Conv2d | nn.Linear)
            nn.init.xavier_uniform_(layer.weight)  # Keras' glorot_uniform
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    if load_weights and cfg.weights is not None:
        from deepopt.zoo import load_weights_file  # the weight-file reader, with the I/O

        load_weights_file(model, cfg.weights)
    return model


def set_training_layout(model: nn.Module, precision: str) -> None:
    """Lay out ``model``'s weights for the fastest training at ``precision``, in place.

    Only the lecture CNN in fp32 changes: its convolutions after the first go to
    channels_last, so conv2, conv3 and the layers between them run in NHWC, where oneDNN's
    convolution gradients are faster (conv2's weight gradient 0.33 vs 0.66 ms a batch).
    Measured on 2 cores, batch 50, epoch seconds (median of 6, interleaved): 0.934 vs
    1.020 with batchnorm, 0.881 vs 0.954 without. conv1 stays NCHW: with one input
    channel its weight gradient (186 vs 124 us) and bn1 (1.4 vs 0.35 ms forward and
    backward) are slower in NHWC. The rest stays NCHW where NHWC lost: the lecture CNN in
    bf16 (0.70-0.72 vs 0.69 s) and ResNet-20 in fp32 (3.1 vs 2.4 s). Call it before
    building the optimizer, whose state then takes the same layout; outputs agree with
    NCHW within float rounding. ``model.to(memory_format=torch.contiguous_format)`` undoes
    it.
    """
    if precision != "fp32" or not isinstance(model, LectureCNN):
        return
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for convolution in convolutions[1:]:
        convolution.to(memory_format=_NHWC)


def _build(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if cfg.name == "lecture_cnn":
        return LectureCNN(
            image_shape=image_shape,
            conv_channels=cfg.conv_channels,
            dense_units=cfg.dense_units,
            num_classes=num_classes,
            batchnorm=cfg.batchnorm,
            activation=cfg.activation,
            dropout=cfg.dropout,
        )
    if cfg.name == "mlp":
        return MLP(
            image_shape=image_shape,
            depth=cfg.depth,
            width=cfg.width,
            num_classes=num_classes,
            batchnorm=cfg.batchnorm,
            activation=cfg.activation,
            dropout=cfg.dropout,
        )
    if cfg.name == "resnet":
        return ResNet(
            image_shape=image_shape,
            blocks=resnet_blocks(cfg.depth),
            base_channels=cfg.base_channels,
            num_classes=num_classes,
            skip=cfg.skip,
            batchnorm=cfg.batchnorm,
            activation=cfg.activation,
            dropout=cfg.dropout,
        )
    raise ConfigError(f"model.name: {cfg.name!r} is not one of lecture_cnn, mlp, resnet")


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


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules (one per hidden layer) in forward order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _ACTIVATION_TYPES)
    ]
