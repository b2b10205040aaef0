"""All weight-file I/O of ``deepopt.models``: state dicts from local files and torch.hub's
cache (downloaded with a timeout), and whether a state dict fits a network.

``model.weights``: a local state-dict file is read with ``weights_only=True`` (never code
execution). An upper-case name (``DEFAULT``, ``IMAGENET1K_V1``) is one of torchvision's
weights for the architecture: read from the torch.hub cache (``$TORCH_HOME/hub/checkpoints``)
or downloaded there with a timeout on every socket operation, so an offline machine gets a
one-line DataError instead of a hang.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from deepopt.config import TORCHVISION_PREFIX, torchvision_weights_name
from deepopt.errors import ConfigError, DataError, one_line
from deepopt.files import UnreadableFileError, load_torch
from deepopt.models.layers import head_name, weight_layers

__all__ = [
    "HUB_TIMEOUT_S",
    "fetch_hub_file",
    "hub_state_dict",
    "load_state",
    "load_weights_file",
    "misfit",
    "read_state_dict",
    "torchvision_state_dict",
]

HUB_TIMEOUT_S = 30.0  # per socket operation of a torch.hub download, seconds


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (``weights_only=True``): a plain {name: tensor}
    mapping, or one under a "state_dict" key."""
    try:
        content = load_torch(path)
    except FileNotFoundError:
        raise ConfigError(
            f"model.weights: {path} not found; give an existing state-dict file, a "
            "torchvision weights name (DEFAULT) for torchvision:<name>, or null"
        ) from None
    except UnreadableFileError as err:
        raise DataError(f"model.weights: {path} cannot be loaded ({err.problem})") from None
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
        raise DataError(
            f"model.weights: cannot download {url} ({one_line(err, with_type=True)}); "
            f"without internet put the file into {cache_dir}/ or set model.weights to a "
            "local copy"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def hub_state_dict(arch: str, weights: str, timeout: float = HUB_TIMEOUT_S) -> dict[str, Any]:
    """torchvision's ``weights`` (e.g. DEFAULT) of ``arch``, from the torch.hub cache or
    downloaded into it."""
    from torchvision.models import get_model_weights  # lazy: start-up time

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


def torchvision_state_dict(arch: str, weights: str) -> Mapping[str, torch.Tensor]:
    """``model.weights`` of ``torchvision:<arch>``: torchvision's weights of that name, or
    a local file."""
    if torchvision_weights_name(weights):
        return hub_state_dict(arch, weights)
    return read_state_dict(Path(weights))


def misfit(model: nn.Module, state: Mapping[str, Any], *, allow_head: bool) -> str | None:
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
    problem = misfit(model, state, allow_head=True)
    if problem is not None:
        raise ConfigError(
            f"model.weights: {source} does not fit {type(model).__name__} for these images "
            f"and classes: {problem}"
        )
    own = model.state_dict()
    kept = [k for k, t in own.items() if state[k].shape != t.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in kept}, strict=False)
    return kept


def load_weights_file(model: nn.Module, path: str) -> list[str]:
    """Start one of deepopt's networks from the state dict in ``path`` (head may differ)."""
    if not weight_layers(model):
        raise ConfigError("model.weights: the network has no layers to load")
    return load_state(model, read_state_dict(Path(path)), path)
