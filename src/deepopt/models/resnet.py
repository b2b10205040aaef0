"""A small residual network for 28x28 or 32x32 images (He et al. 2016, section 4.2) and
its plain twin without skip connections, for the depth study."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from deepopt.models.lecture import new_activation, new_batchnorm

__all__ = ["ResNet", "ResidualBlock"]


class _Shortcut(nn.Module):
    """He et al.'s option A, parameter-free: identity, or every second pixel with zero
    channels appended where a block halves the size and widens:
    [B, c_in, h, w] -> [B, c_out, ceil(h/s), ...]."""

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
        bn_momentum: float,
        bn_eps: float,
        activation: str,
    ) -> None:
        super().__init__()

        def norm() -> nn.Module:
            if not batchnorm:
                return nn.Identity()
            return new_batchnorm(channels, spatial=True, momentum=bn_momentum, eps=bn_eps)

        # [B, in, h, w] -> [B, channels, ceil(h / stride), ceil(w / stride)]
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm()
        self.act1 = new_activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm()
        self.shortcut = _Shortcut(stride, channels - in_channels) if skip else None
        self.act2 = new_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)  # type: ignore[no-any-return]


class ResNet(nn.Sequential):
    """He et al.'s CIFAR ResNet with ``blocks`` residual blocks per stage, returning logits.

    A 3x3 stem convolution, three stages of ``blocks`` residual blocks with
    ``base_channels``, twice and four times as many channels, the second and third stage
    starting with stride 2, then global average pooling and the logits: ``depth = 6 blocks
    + 2`` weight layers (8, 14, 20, ...). The shortcuts have no parameters, so ``skip:
    false`` (the "plain" network) has exactly the same layers and parameters: the two
    differ in nothing but the skip connections.

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
        bn_momentum: float,
        bn_eps: float,
        activation: str,
        dropout: float,
    ) -> None:
        in_channels = image_shape[0]
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=not batchnorm)),
        ]
        if batchnorm:
            bn0 = new_batchnorm(base_channels, spatial=True, momentum=bn_momentum, eps=bn_eps)
            layers.append(("bn0", bn0))
        layers.append(("act0", new_activation(activation)))
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
                        bn_momentum=bn_momentum,
                        bn_eps=bn_eps,
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
