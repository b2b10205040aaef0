"""The lecture's CNN and the MLP: parameter counts, biases, block order, shapes, dropout,
activations and Keras' initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig
from deepopt.errors import DataError
from deepopt.models import (
    MLP,
    LectureCNN,
    activation_layers,
    build_model,
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
