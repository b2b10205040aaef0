"""torchvision's classification networks for deepopt's small images, and weight files.

``model.name: torchvision:<name>`` builds any of
``torchvision.models.list_models(module=torchvision.models)`` and adapts it:

- **stem**: the first ``Conv2d`` (in registration order, which is forward order in
  torchvision's classifiers) is replaced by one taking the images' channels (1 for the
  MNIST family, 3 for CIFAR-10) with stride 1; kernel, padding and width stay. The ImageNet
  stems halve 224-pixel images at once; a 28-pixel image would be 1 pixel wide before the
  last stage. The later downsampling (resnet's max pool, the stages) stays, which keeps the
  cost a quarter of dropping it too. With pretrained 3-channel weights and 1-channel images
  the kernel is summed over its input channels: a gray image x then gives the response the
  RGB image (x, x, x) gave.
- **head**: the last ``Linear``/``Conv2d`` (``fc``, ``classifier.*``) gets ``num_classes``
  outputs: built so for random weights, a fresh layer after loading pretrained weights.

A network that still cannot take the images (``vit_*`` and ``swin_*`` want 224 pixels,
``inception_v3`` at least 75) fails at build time with a one-line ConfigError from a probe
forward pass. torchvision networks keep torchvision's own initialisation (``model.init``
applies to deepopt's networks).

``model.weights``: a local state-dict file is read with ``torch.load(weights_only=True)``
(never code execution), in torchvision's layout (ImageNet stem and head, adapted after
loading) or in the adapted one (what deepopt saved). An upper-case name (``DEFAULT``,
``IMAGENET1K_V1``) is one of torchvision's weights for the architecture: read from the
torch.hub cache (``$TORCH_HOME/hub/checkpoints``) or downloaded there with a timeout on
every socket operation, so an offline machine gets a one-line DataError instead of a hang.
"""

from __future__ import annotations

import socket
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from deepopt.config import TORCHVISION_PREFIX, ModelConfig, torchvision_weights_name
from deepopt.errors import ConfigError, DataError
from deepopt.models import head_name, weight_layers

__all__ = [
    "HUB_TIMEOUT_S",
    "adapt_stem",
    "build",
    "fetch_hub_file",
    "hub_state_dict",
    "load_state",
    "load_weights_file",
    "read_state_dict",
    "replace_head",
]

HUB_TIMEOUT_S = 30.0  # per socket operation of a torch.hub download, seconds
# Architectures whose auxiliary classifiers make the training-mode output a tuple.
_AUX_LOGITS = frozenset({"googlenet", "inception_v3"})


def adapt_stem(model: nn.Module, in_channels: int, *, pretrained: bool) -> str:
    """Replace the first Conv2d by one with ``in_channels`` inputs and stride 1 (in place);
    its name. Pretrained kernels are carried over (summed over channels for 1 input)."""
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
                # Each new channel sees the old channels' sum shared out: same response to
                # an image whose channels are all equal.
                summed = kernel.sum(dim=1, keepdim=True) / in_channels
                kernel = summed.expand(-1, in_channels, -1, -1)
            new.weight.copy_(kernel)
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias)
    model.set_submodule(name, new)
    return str(name)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """A fresh last Linear/Conv2d with ``num_classes`` outputs (in place); its name."""
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
    and return [2, num_classes] logits."""
    shape = "x".join(map(str, image_shape))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *image_shape))
    except Exception as err:  # any failure inside the network: its message in one line
        text = " ".join(str(err).split())[:160]
        raise ConfigError(
            f"model.name: {TORCHVISION_PREFIX}{arch} cannot take {shape} images even after "
            f"adapting its stem ({type(err).__name__}: {text}); choose a convolutional "
            "network such as torchvision:resnet18 or torchvision:mobilenet_v3_small"
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
    cfg: ModelConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    load_weights: bool = True,
) -> nn.Module:
    """``torchvision:<name>`` adapted to ``image_shape`` and ``num_classes`` (see above),
    starting from ``cfg.weights`` when ``load_weights``."""
    arch = cfg.name.removeprefix(TORCHVISION_PREFIX)
    state: Mapping[str, torch.Tensor] | None = None
    if load_weights and cfg.weights is not None:
        if torchvision_weights_name(cfg.weights):
            state = hub_state_dict(arch, cfg.weights)
        else:
            state = read_state_dict(Path(cfg.weights))
    model = _torchvision_model(arch, num_classes)
    adapt_stem(model, image_shape[0], pretrained=False)
    if state is not None and _misfit(model, state, allow_head=False) is None:
        model.load_state_dict(state)  # the adapted layout, as deepopt saves it
    elif state is not None:
        native = _torchvision_model(arch, None)  # torchvision's layout: ImageNet stem, head
        if _misfit(native, state, allow_head=True) is None:
            load_state(native, state, str(cfg.weights))
            adapt_stem(native, image_shape[0], pretrained=True)
            if _out_features(native) != num_classes:
                replace_head(native, num_classes)
            model = native
        else:  # the adapted layout with another head, or a misfit to report
            load_state(model, state, str(cfg.weights))
    _probe(model, image_shape, num_classes, arch)
    return model


def _out_features(model: nn.Module) -> int:
    head = model.get_submodule(head_name(model))
    return int(head.out_features if isinstance(head, nn.Linear) else head.out_channels)  # type: ignore[arg-type]


def _misfit(model: nn.Module, state: Mapping[str, Any], *, allow_head: bool) -> str | None:
    """Why ``state`` cannot be loaded into ``model`` (None: it can). With ``allow_head``
    the head's tensors may differ in shape (they are then left as initialised)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        return ", ".join(parts)
    head = head_name(model) + "."
    for key, tensor in own.items():
        other = state[key]
        if not isinstance(other, torch.Tensor):
            return f"{key} is a {type(other).__name__}, not a tensor"
        if other.shape != tensor.shape and not (allow_head and key.startswith(head)):
            return f"{key} has shape {list(other.shape)}, the network's {list(tensor.shape)}"
    return None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model``; a head of another class count is left as initialised
    ("head swapped"). The keys left as initialised; ConfigError when it does not fit."""
    problem = _misfit(model, state, allow_head=True)
    if problem is not None:
        raise ConfigError(
            f"model.weights: {source} does not fit {type(model).__name__} for these images "
            f"and classes: {problem}"
        )
    own = model.state_dict()
    kept = [k for k, t in own.items() if state[k].shape != t.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in kept}, strict=False)
    return kept


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (``weights_only=True``): a plain {name: tensor}
    mapping, or one under a "state_dict" key."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol note: one line below
            content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"model.weights: {path} not found; give an existing state-dict file, a "
            "torchvision weights name (DEFAULT) for torchvision:<name>, or null"
        ) from None
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if first.startswith("Weights only load failed"):
            first = "it holds objects other than tensors and plain data; refused unread"
        raise DataError(f"model.weights: {path} cannot be loaded ({first[:160]})") from None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()
    ):
        raise DataError(
            f"model.weights: {path} holds no state dict ({{name: tensor}}, or one under "
            "'state_dict')"
        )
    return content


def fetch_hub_file(url: str, cache_dir: Path, timeout: float = HUB_TIMEOUT_S) -> Path:
    """The file of ``url`` in ``cache_dir``, downloaded there first if missing (sha256
    checked against the hash in torchvision's file names); DataError when it cannot be."""
    name = Path(urlparse(url).path).name
    cached = cache_dir / name
    if cached.is_file():
        return cached
    from torch.hub import HASH_REGEX, download_url_to_file

    match = HASH_REGEX.search(name)
    print(f"deepopt: downloading {url} to {cached}", file=sys.stderr, flush=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Writes a .partial file and renames it when complete and verified.
        download_url_to_file(url, str(cached), match.group(1) if match else None, progress=False)
    except Exception as err:  # no network, timeout, HTTP error, hash mismatch
        text = " ".join(str(err).split())[:160]
        raise DataError(
            f"model.weights: cannot download {url} ({type(err).__name__}: {text}); without "
            f"internet put the file into {cache_dir}/ or set model.weights to a local copy"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def hub_state_dict(arch: str, weights: str, timeout: float = HUB_TIMEOUT_S) -> dict[str, Any]:
    """torchvision's ``weights`` (e.g. DEFAULT) of ``arch``, from the torch.hub cache or
    downloaded into it."""
    from torchvision.models import get_model_weights

    members = get_model_weights(arch).__members__
    if weights not in members:
        allowed = ", ".join(members) or "none"
        raise ConfigError(
            f"model.weights: {weights!r} is not a weights name of {TORCHVISION_PREFIX}{arch} "
            f"(its weights: {allowed}), nor a file path"
        )
    url = members[weights].url
    cached = fetch_hub_file(url, Path(torch.hub.get_dir()) / "checkpoints", timeout)
    return read_state_dict(cached)


def load_weights_file(model: nn.Module, path: str) -> list[str]:
    """Start one of deepopt's networks from the state dict in ``path`` (head may differ)."""
    if not weight_layers(model):
        raise ConfigError("model.weights: the network has no layers to load")
    return load_state(model, read_state_dict(Path(path)), path)
