"""torchvision's classification networks (``model.name: torchvision:<name>``) adapted to
deepopt's small images and class counts; torchvision itself is imported only for them."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepopt.config import TORCHVISION_PREFIX
from deepopt.errors import ConfigError, one_line
from deepopt.models.layers import head_name, out_features
from deepopt.models.weights import load_state, misfit

__all__ = ["adapt_stem", "build", "replace_head"]

# Architectures whose auxiliary classifiers make the training-mode output a tuple.
_AUX_LOGITS = frozenset({"googlenet", "inception_v3"})


def adapt_stem(model: nn.Module, in_channels: int, *, pretrained: bool) -> str:
    """Replace the first Conv2d by one with ``in_channels`` inputs and stride 1 (in place);
    its name. Pretrained kernels are carried over (summed over channels for 1 input).

    The first Conv2d in registration order is the stem (registration order is forward
    order in torchvision's classifiers); kernel, padding and width stay. The ImageNet stems
    halve 224-pixel images at once; a 28-pixel image would be 1 pixel wide before the last
    stage. The later downsampling (resnet's max pool, the stages) stays, which keeps the
    cost a quarter of dropping it too.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"model.name: {type(model).__name__} has no Conv2d stem to adapt")
    name, old = convs[0]
    if old.groups != 1:
        raise ConfigError(f"model.name: the stem {name} of {type(model).__name__} is grouped")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        stride=1,
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            kernel = old.weight  # [out, in_old, k, k]
            if in_channels != old.in_channels:
                # Each new channel sees the old channels' sum shared out: a gray image x
                # gives the response the RGB image (x, x, x) gave.
                summed = kernel.sum(dim=1, keepdim=True) / in_channels
                kernel = summed.expand(-1, in_channels, -1, -1)
            new.weight.copy_(kernel)
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias)
    model.set_submodule(name, new)
    return str(name)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """A fresh last Linear/Conv2d (``fc``, ``classifier.*``) with ``num_classes`` outputs
    (in place); its name."""
    name = head_name(model)
    old = model.get_submodule(name)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        assert isinstance(old, nn.Conv2d)
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,  # type: ignore[arg-type]
            stride=old.stride,  # type: ignore[arg-type]
            padding=old.padding,  # type: ignore[arg-type]
            bias=old.bias is not None,
        )
    model.set_submodule(name, new)
    return name


def _torchvision_model(arch: str, num_classes: int | None) -> nn.Module:
    from torchvision.models import get_model  # lazy: only torchvision:<name> needs it

    options: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if arch in _AUX_LOGITS:
        options.update(aux_logits=False, init_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init-scheme FutureWarnings of a few architectures
        model: nn.Module = get_model(arch, weights=None, **options)
    return model


def _probe(
    model: nn.Module, image_shape: tuple[int, int, int], num_classes: int, arch: str
) -> None:
    """One eval-mode forward pass of two blank images: the network must take the images
    and return [2, num_classes] logits (``vit_*`` and ``swin_*`` want 224 pixels,
    ``inception_v3`` at least 75: a one-line ConfigError at build time)."""
    shape = "x".join(map(str, image_shape))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *image_shape))
    except Exception as err:  # any failure inside the network: its message in one line
        raise ConfigError(
            f"model.name: {TORCHVISION_PREFIX}{arch} cannot take {shape} images even after "
            f"adapting its stem ({one_line(err, with_type=True)}); choose a "
            "convolutional network such as torchvision:resnet18 or "
            "torchvision:mobilenet_v3_small"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.name: {TORCHVISION_PREFIX}{arch} returns {got} for two {shape} images, "
            f"not [2, {num_classes}] logits"
        )


def build(
    arch: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    state: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
) -> nn.Module:
    """torchvision's ``arch`` with its stem adapted to ``image_shape`` and a head of
    ``num_classes``, starting from ``state`` (read from ``source``) when given.

    ``state`` may be in torchvision's layout (ImageNet stem and head: adapted after
    loading, the head swapped for a fresh one) or in the adapted one (what deepopt saved).
    torchvision's networks keep torchvision's own initialisation.
    """
    model = _torchvision_model(arch, num_classes)
    adapt_stem(model, image_shape[0], pretrained=False)
    if state is not None and misfit(model, state, allow_head=False) is None:
        model.load_state_dict(state)  # the adapted layout, as deepopt saves it
    elif state is not None:
        native = _torchvision_model(arch, None)  # torchvision's layout: ImageNet stem, head
        if misfit(native, state, allow_head=True) is None:
            load_state(native, state, source)
            adapt_stem(native, image_shape[0], pretrained=True)
            if out_features(native) != num_classes:
                replace_head(native, num_classes)
            model = native
        else:  # the adapted layout with another head, or a misfit to report
            load_state(model, state, source)
    _probe(model, image_shape, num_classes, arch)
    return model
