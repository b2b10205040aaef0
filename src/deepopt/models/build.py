"""``build_model``: the network named by ``model.name``, initialised by ``model.init`` and
started from ``model.weights`` (read by ``deepopt.models.weights``)."""

from __future__ import annotations

from torch import nn

from deepopt.config import TORCHVISION_PREFIX, ModelConfig, resnet_blocks
from deepopt.errors import ConfigError, DataError
from deepopt.models import torchvision, weights
from deepopt.models.layers import weight_layers
from deepopt.models.lecture import MLP, LectureCNN
from deepopt.models.resnet import ResNet

__all__ = ["build_model"]


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

    ``cfg.init`` applies to deepopt's networks: ``keras`` (the default) is the lecture's,
    Keras' layer defaults: Glorot-uniform weights and zero biases. ``torch`` keeps
    PyTorch's defaults (Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in))), whose weights are up to sqrt(3) times smaller: in a 10-layer ReLU MLP
    without batchnorm that alone shrinks the gradient by about 3x per layer, which would
    blur the vanishing-gradient study. BatchNorm starts at gamma=1, beta=0 in both, and
    takes ``cfg.bn_momentum`` and ``cfg.bn_eps`` (Keras' 0.99 and 1e-3 by default).
    torchvision's networks keep their own BatchNorm settings (PyTorch's 0.1 and 1e-5, those
    their pretrained weights were trained with): ``cfg.bn_*`` and ``cfg.init`` do not
    reach them.
    """
    if len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape):
        raise DataError(
            f"image shape {tuple(image_shape)} must be (channels, height, width) of positive ints"
        )
    if num_classes < 2:
        raise DataError(f"num_classes {num_classes} must be at least 2")
    if cfg.name.startswith(TORCHVISION_PREFIX):
        arch = cfg.name.removeprefix(TORCHVISION_PREFIX)
        state = None
        if load_weights and cfg.weights is not None:
            state = weights.torchvision_state_dict(arch, cfg.weights)
        return torchvision.build(arch, image_shape, num_classes, state, str(cfg.weights))
    model = _build(cfg, image_shape, num_classes)
    if cfg.init == "keras":
        for _, layer in weight_layers(model):
            assert isinstance(layer, nn.Conv2d | nn.Linear)
            nn.init.xavier_uniform_(layer.weight)  # Keras' glorot_uniform
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    if load_weights and cfg.weights is not None:
        weights.load_weights_file(model, cfg.weights)
    return model


def _build(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The one dispatch by ``model.name`` among deepopt's own networks."""
    if cfg.name == "lecture_cnn":
        return LectureCNN(
            image_shape=image_shape,
            conv_channels=cfg.conv_channels,
            dense_units=cfg.dense_units,
            num_classes=num_classes,
            batchnorm=cfg.batchnorm,
            bn_momentum=cfg.bn_momentum,
            bn_eps=cfg.bn_eps,
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
            bn_momentum=cfg.bn_momentum,
            bn_eps=cfg.bn_eps,
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
            bn_momentum=cfg.bn_momentum,
            bn_eps=cfg.bn_eps,
            activation=cfg.activation,
            dropout=cfg.dropout,
        )
    raise ConfigError(f"model.name: {cfg.name!r} is not one of lecture_cnn, mlp, resnet")
