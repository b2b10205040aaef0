"""The lecture's CNN, the MLP and the ResNet: parameter counts, biases, shapes, dropout,
layer names, skip connections, starting weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig, parse_params
from deepopt.errors import ConfigError, DataError
from deepopt.models import (
    MLP,
    LectureCNN,
    ResidualBlock,
    ResNet,
    activation_layers,
    build_model,
    head_name,
    set_training_layout,
    weight_layers,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lecture_cnn_parameter_count_with_batchnorm() -> None:
    # Keras build_nn: convs and hidden dense without bias; BN adds gamma and beta per channel.
    conv1 = 1 * 10 * 5 * 5 + 2 * 10
    conv2 = 10 * 40 * 5 * 5 + 2 * 40
    conv3 = 40 * 80 * 5 * 5 + 2 * 80
    dense4 = 80 * 7 * 7 * 50 + 2 * 50
    logits = 50 * 10 + 10
    model = build_model(ModelConfig(batchnorm=True))
    assert n_params(model) == conv1 + conv2 + conv3 + dense4 + logits == 287_120


def test_lecture_cnn_parameter_count_without_batchnorm() -> None:
    conv1 = 1 * 10 * 5 * 5 + 10
    conv2 = 10 * 40 * 5 * 5 + 40
    conv3 = 40 * 80 * 5 * 5 + 80
    dense4 = 80 * 7 * 7 * 50 + 50
    logits = 50 * 10 + 10
    model = build_model(ModelConfig(batchnorm=False))
    assert n_params(model) == conv1 + conv2 + conv3 + dense4 + logits == 286_940


def test_batchnorm_layers_have_no_bias_and_the_output_layer_has_one() -> None:
    layers = dict(weight_layers(build_model(ModelConfig(batchnorm=True))))
    assert [name for name in layers] == ["conv1", "conv2", "conv3", "dense4", "logits"]
    for name in ("conv1", "conv2", "conv3", "dense4"):
        assert layers[name].bias is None, name
    assert layers["logits"].bias is not None
    model = build_model(ModelConfig(batchnorm=True))
    norms = [type(m) for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert norms == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]


def test_without_batchnorm_every_layer_has_a_bias_and_no_norm() -> None:
    model = build_model(ModelConfig(batchnorm=False))
    assert all(layer.bias is not None for _, layer in weight_layers(model))
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())


def test_block_order_is_layer_norm_activation_dropout() -> None:
    model = build_model(ModelConfig(batchnorm=True, dropout=0.2))
    names = [name for name, _ in model.named_children()]
    assert names[:5] == ["conv1", "bn1", "act1", "drop1", "conv2"]
    assert names[-6:] == ["flatten", "dense4", "bn4", "act4", "drop4", "logits"]


def test_output_is_logits_of_shape_batch_by_classes() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    # Logits, not probabilities: rows do not sum to 1 (softmax is in the loss).
    assert not torch.allclose(logits.sum(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    ("image_shape", "expected"),
    [((1, 28, 28), [(14, 14), (7, 7), (7, 7)]), ((3, 32, 30), [(16, 15), (8, 8), (8, 8)])],
)
def test_conv_outputs_have_keras_same_sizes(
    image_shape: tuple[int, int, int], expected: list[tuple[int, int]]
) -> None:
    # Keras 'same': ceil(n / stride) for the strides 2, 2, 1.
    _, height, width = image_shape
    keras = []
    for stride in (2, 2, 1):
        height, width = math.ceil(height / stride), math.ceil(width / stride)
        keras.append((height, width))
    assert keras == expected
    model = build_model(ModelConfig(conv_channels=(4, 6, 8)), image_shape=image_shape)
    seen: dict[str, tuple[int, ...]] = {}
    for name, layer in weight_layers(model)[:3]:
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, tuple(out.shape))
        )
    model(torch.randn(2, *image_shape))
    assert seen == {
        "conv1": (2, 4, *expected[0]),
        "conv2": (2, 6, *expected[1]),
        "conv3": (2, 8, *expected[2]),
    }
    assert isinstance(model, LectureCNN)
    assert model.feature_shape == (8, *expected[2])


def test_dropout_after_each_hidden_block_only_when_p_positive() -> None:
    with_dropout = build_model(ModelConfig(dropout=0.3))
    drops = [m for m in with_dropout.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 4 and all(d.p == 0.3 for d in drops)
    without = build_model(ModelConfig(dropout=0.0))
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())


@pytest.mark.parametrize(("activation", "kind"), [("relu", nn.ReLU), ("tanh", nn.Tanh)])
def test_one_activation_instance_per_hidden_layer(activation: str, kind: type[nn.Module]) -> None:
    model = build_model(ModelConfig(activation=activation))  # type: ignore[arg-type]
    acts = activation_layers(model)
    assert [name for name, _ in acts] == ["act1", "act2", "act3", "act4"]
    assert all(isinstance(m, kind) for _, m in acts)
    assert len({id(m) for _, m in acts}) == 4


def test_relu_sparsity_is_measurable_per_layer_with_hooks() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(batchnorm=True)).train()
    zero_fraction: dict[str, float] = {}
    for name, act in activation_layers(model):
        act.register_forward_hook(
            lambda _m, _i, out, name=name: zero_fraction.__setitem__(
                name, float((out == 0).float().mean())
            )
        )
    model(torch.randn(8, 1, 28, 28))
    # After batchnorm about half of each layer's pre-activations are negative.
    assert set(zero_fraction) == {"act1", "act2", "act3", "act4"}
    assert all(0.2 < f < 0.8 for f in zero_fraction.values())


def test_mlp_has_depth_hidden_layers_of_width() -> None:
    model = build_model(ModelConfig(name="mlp", depth=5, width=16, batchnorm=False))
    assert isinstance(model, MLP)
    layers = weight_layers(model)
    assert [name for name, _ in layers] == [
        "dense1",
        "dense2",
        "dense3",
        "dense4",
        "dense5",
        "logits",
    ]
    assert [(m.in_features, m.out_features) for _, m in layers] == [  # type: ignore[misc]
        (784, 16),
        (16, 16),
        (16, 16),
        (16, 16),
        (16, 16),
        (16, 10),
    ]
    assert n_params(model) == 784 * 16 + 16 + 4 * (16 * 16 + 16) + 16 * 10 + 10
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_mlp_with_batchnorm_has_no_hidden_bias() -> None:
    model = build_model(ModelConfig(name="mlp", depth=3, width=8, batchnorm=True))
    layers = weight_layers(model)
    assert all(m.bias is None for _, m in layers[:-1])
    assert layers[-1][1].bias is not None
    assert n_params(model) == 784 * 8 + 2 * 8 + 2 * (8 * 8 + 2 * 8) + 8 * 10 + 10


def test_custom_class_count() -> None:
    model = build_model(ModelConfig(), image_shape=(1, 28, 28), num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("image_shape", [(1, 28), (0, 28, 28), (1, -2, 28)])
def test_bad_image_shape_is_a_data_error(image_shape: tuple[int, int, int]) -> None:
    with pytest.raises(DataError, match="image shape"):
        build_model(ModelConfig(), image_shape=image_shape)


def test_keras_init_is_glorot_uniform_with_zero_biases() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=2, width=64, batchnorm=False))
    first = model.dense1  # 784 -> 64
    bound = math.sqrt(6.0 / (784 + 64))
    assert float(first.weight.detach().abs().max()) <= bound
    assert float(first.weight.detach().abs().max()) > 0.9 * bound  # fills the Glorot range
    assert torch.count_nonzero(first.bias) == 0
    torch_init = build_model(
        ModelConfig(name="mlp", depth=2, width=64, batchnorm=False, init="torch")
    )
    assert torch.count_nonzero(torch_init.dense1.bias) > 0


# ---------------------------------------------------------------------------------------
# ResNet: residual blocks, plain stacks, depth


def _block(skip: bool, in_channels: int = 4, channels: int = 4, stride: int = 1) -> nn.Module:
    block = ResidualBlock(
        in_channels, channels, stride, skip=skip, batchnorm=True, activation="relu"
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


def test_weights_file_starts_a_network_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(ModelConfig(name="resnet", depth=8, base_channels=4), num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    config = ModelConfig(name="resnet", depth=8, base_channels=4, weights=str(tmp_path / "w.pt"))
    model = build_model(config, num_classes=3)
    assert torch.equal(model.conv0.weight, source.conv0.weight)
    assert model.logits.out_features == 3  # the 5-class head could not fit: left as built
    rebuilt = build_model(config, num_classes=3, load_weights=False)  # evaluate's rebuild
    assert not torch.equal(rebuilt.conv0.weight, source.conv0.weight)


def test_weights_that_do_not_fit_are_a_one_line_config_error(tmp_path: Path) -> None:
    other = build_model(ModelConfig(name="resnet", depth=14, base_channels=4))
    torch.save(other.state_dict(), tmp_path / "w.pt")
    config = ModelConfig(name="resnet", depth=8, base_channels=4, weights=str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match=r"model\.weights: .*w\.pt does not fit .*unexpected"):
        build_model(config)
    missing = ModelConfig(weights=str(tmp_path / "none.pt"))
    with pytest.raises(ConfigError, match=r"model\.weights: .*none\.pt not found"):
        build_model(missing)


def _nhwc(x: torch.Tensor) -> bool:
    """Is ``x`` channels_last (and not also plain contiguous, as a 1-channel tensor is)?"""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _layouts(model: nn.Module) -> dict[str, bool]:
    return {name: _nhwc(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("batchnorm", [True, False])
def test_fp32_training_layout_changes_memory_not_the_lecture_cnns_outputs_or_gradients(
    batchnorm: bool,
) -> None:
    torch.manual_seed(0)
    plain = build_model(ModelConfig(batchnorm=batchnorm))
    laid_out = build_model(ModelConfig(batchnorm=batchnorm))
    laid_out.load_state_dict(plain.state_dict())
    set_training_layout(laid_out, "fp32")
    assert _layouts(laid_out) == {"conv1": False, "conv2": True, "conv3": True}
    images = torch.randn(16, 1, 28, 28)
    outputs = [model(images) for model in (plain, laid_out)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for output in outputs:
        output.logsumexp(dim=1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), laid_out.parameters(), strict=True):
        assert q.grad is not None and p.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Undone after training, the weights are NCHW again and load into a plain network.
    saved = laid_out.to(memory_format=torch.contiguous_format).state_dict()
    assert all(tensor.is_contiguous() for tensor in saved.values())
    assert saved.keys() == plain.state_dict().keys()
    fresh = build_model(ModelConfig(batchnorm=batchnorm))
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(images), outputs[0], rtol=1e-5, atol=1e-5)


def test_fp32_layout_sends_each_activation_gradient_back_in_its_own_layout() -> None:
    """A ReLU's backward that mixes layouts takes 20x as long: the gradient reaching each
    activation's output must have that output's layout. (output NHWC, gradient NHWC)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    set_training_layout(model, "fp32")
    seen: dict[str, tuple[bool, bool]] = {}
    for name, layer in activation_layers(model):

        def watch(_m: nn.Module, _i: object, out: torch.Tensor, key: str = name) -> None:
            out_nhwc = _nhwc(out)
            out.register_hook(lambda grad: seen.__setitem__(key, (out_nhwc, _nhwc(grad))))

        layer.register_forward_hook(watch)
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    nchw, nhwc = (False, False), (True, True)
    assert seen == {"act1": nchw, "act2": nhwc, "act3": nhwc, "act4": nchw}


@pytest.mark.parametrize(
    ("cfg", "precision"),
    [
        (ModelConfig(), "bf16"),
        (ModelConfig(name="resnet", depth=8, base_channels=4), "fp32"),
        (ModelConfig(name="mlp", depth=2, width=8), "fp32"),
    ],
)
def test_other_networks_and_bf16_keep_the_nchw_layout(cfg: ModelConfig, precision: str) -> None:
    model = build_model(cfg)
    before = {name: p.stride() for name, p in model.named_parameters()}
    set_training_layout(model, precision)
    assert {name: p.stride() for name, p in model.named_parameters()} == before
