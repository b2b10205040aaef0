"""The ResNet: residual blocks, skip connections, depth 6n+2, grayscale and colour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig, parse_params
from deepopt.errors import ConfigError
from deepopt.models import (
    ResidualBlock,
    ResNet,
    activation_layers,
    build_model,
    head_name,
    weight_layers,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# ResNet: residual blocks, plain stacks, depth


def _block(skip: bool, in_channels: int = 4, channels: int = 4, stride: int = 1) -> nn.Module:
    block = ResidualBlock(
        in_channels,
        channels,
        stride,
        skip=skip,
        batchnorm=True,
        bn_momentum=0.01,
        bn_eps=1e-3,
        activation="relu",
    )
    return block.eval()  # BN with its initial statistics: the identity map


@pytest.mark.parametrize(
    ("in_channels", "channels", "stride", "out_shape"),
    [(4, 4, 1, (2, 4, 28, 28)), (4, 8, 2, (2, 8, 14, 14)), (8, 16, 2, (2, 16, 4, 4))],
)
def test_residual_block_keeps_or_halves_the_size_as_its_stride_says(
    in_channels: int, channels: int, stride: int, out_shape: tuple[int, ...]
) -> None:
    size = 7 if channels == 16 else 28  # 7 -> 4: odd sizes round up like the conv
    x = torch.randn(2, in_channels, size, size)
    for skip in (True, False):
        assert _block(skip, in_channels, channels, stride)(x).shape == out_shape


def test_the_skip_connection_adds_the_input_and_skip_false_removes_it() -> None:
    x = torch.randn(2, 4, 6, 6)
    residual, plain = _block(skip=True), _block(skip=False)
    for block in (residual, plain):
        nn.init.zeros_(block.conv2.weight)  # the residual branch now outputs bn2(0) = 0
    with torch.no_grad():
        assert torch.equal(residual(x), torch.relu(x))  # relu(0 + identity)
        assert torch.equal(plain(x), torch.zeros_like(x))  # nothing but the branch
    assert plain.shortcut is None


def test_downsampling_shortcut_takes_every_second_pixel_and_pads_zero_channels() -> None:
    block = _block(skip=True, in_channels=2, channels=4, stride=2)
    nn.init.zeros_(block.conv2.weight)
    x = torch.rand(1, 2, 6, 6)  # non-negative: relu keeps the shortcut as it is
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out[:, :2], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 2:]) == 0


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (14, 2), (20, 3)])
def test_resnet_depth_counts_its_weight_layers(depth: int, blocks: int) -> None:
    model = build_model(ModelConfig(name="resnet", depth=depth, base_channels=4))
    assert isinstance(model, ResNet)
    layers = [name for name, _ in weight_layers(model)]
    assert len(layers) == depth == 6 * blocks + 2
    assert layers[:3] == ["conv0", "stage1.block1.conv1", "stage1.block1.conv2"]
    assert layers[-1] == "logits" == head_name(model)
    assert len(activation_layers(model)) == depth - 1  # one per hidden layer


def test_plain_and_residual_networks_have_the_same_layers_and_parameters() -> None:
    residual = build_model(ModelConfig(name="resnet", depth=14, base_channels=4, skip=True))
    plain = build_model(ModelConfig(name="resnet", depth=14, base_channels=4, skip=False))
    assert [n for n, _ in weight_layers(plain)] == [n for n, _ in weight_layers(residual)]
    assert n_params(plain) == n_params(residual)
    plain.load_state_dict(residual.state_dict())  # the same tensors, only the wiring differs


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
def test_resnet_gives_logits_for_grayscale_and_colour_images(
    image_shape: tuple[int, int, int],
) -> None:
    for batchnorm in (True, False):
        config = ModelConfig(name="resnet", depth=8, base_channels=4, batchnorm=batchnorm)
        model = build_model(config, image_shape=image_shape, num_classes=7)
        assert model(torch.randn(2, *image_shape)).shape == (2, 7)


@pytest.mark.parametrize("depth", [7, 10, 21])
def test_resnet_depth_must_be_6n_plus_2(depth: int) -> None:
    with pytest.raises(ConfigError, match=rf"^p: model\.depth: {depth} is not 6n\+2"):
        parse_params({"model": {"name": "resnet", "depth": depth}}, source="p")
    ModelConfig(name="mlp", depth=depth)  # other networks take any depth
