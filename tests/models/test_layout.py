"""The memory layout: training in channels_last changes memory, not outputs or gradients;
saving and evaluation layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig
from deepopt.models import (
    activation_layers,
    build_model,
    evaluation_layout,
    set_portable_layout,
    set_training_layout,
)


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
    set_portable_layout(laid_out)
    saved = laid_out.state_dict()
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


@pytest.mark.parametrize(
    "cfg", [ModelConfig(), ModelConfig(name="resnet", depth=8, base_channels=4)]
)
def test_evaluation_layout_is_channels_last_with_the_same_logits(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = model(images)
    laid_out, nhwc_images = evaluation_layout(model, images)
    assert laid_out is model  # in place, as nn.Module.to
    assert nhwc_images.is_contiguous(memory_format=torch.channels_last)
    wide = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert wide and all(_nhwc(weight) for weight in wide)
    with torch.no_grad():
        torch.testing.assert_close(laid_out(nhwc_images), expected, rtol=1e-5, atol=1e-5)
    set_portable_layout(model)
    assert all(p.is_contiguous() for p in model.parameters())
