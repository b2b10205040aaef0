"""torchvision networks adapted to 1x28x28 and 3x32x32 images, and weights from files and
torch.hub's cache; a download that cannot happen fails in one line, never hangs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig, parse_params
from deepopt.errors import ConfigError, DataError
from deepopt.models import build_model, head_name, weights
from deepopt.models import torchvision as deepopt_torchvision

SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_networks_give_10_logits_for_grayscale_and_colour_images(arch: str) -> None:
    for shape in SHAPES:
        model = build_model(ModelConfig(name=f"torchvision:{arch}"), image_shape=shape)
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert stem.in_channels == shape[0] and stem.stride == (1, 1)
        head = model.get_submodule(head_name(model))
        assert isinstance(head, nn.Linear) and head.out_features == 10
        assert model.eval()(torch.randn(3, *shape)).shape == (3, 10)


def test_unknown_torchvision_name_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"model\.name: .*'torchvision:resnet18'\?"):
        parse_params({"model": {"name": "torchvision:resnet81"}})


def test_torchvision_weights_names_need_a_torchvision_network() -> None:
    with pytest.raises(ConfigError, match=r"model\.weights: 'DEFAULT' names torchvision"):
        parse_params({"model": {"name": "resnet", "weights": "DEFAULT"}})


def test_a_network_that_cannot_take_the_images_fails_at_build_time_in_one_line() -> None:
    # a 30x30 kernel cannot slide over a 28x28 image: as vit_* (224 px) or vgg at 28 px
    too_big = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 10, 30), nn.Flatten())
    with pytest.raises(ConfigError, match=r"^model\.name: torchvision:toy cannot take 1x28x28"):
        deepopt_torchvision._probe(too_big, (1, 28, 28), 10, "toy")


def _native(arch: str) -> nn.Module:
    """torchvision's own layout: 3-channel stem, 1000 classes."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    model: nn.Module = get_model(arch, weights=None)
    return model


@pytest.mark.slow
def test_pretrained_native_weights_get_a_summed_stem_and_a_new_head(tmp_path: Path) -> None:
    native = _native("mobilenet_v3_small")
    torch.save(native.state_dict(), tmp_path / "imagenet.pth")
    config = ModelConfig(
        name="torchvision:mobilenet_v3_small", weights=str(tmp_path / "imagenet.pth")
    )
    model = build_model(config, image_shape=(1, 28, 28))
    stem, old_stem = model.features[0][0], native.features[0][0]
    # A gray image x meets the RGB kernel summed over its channels: the response to (x, x, x).
    assert torch.allclose(stem.weight, old_stem.weight.sum(dim=1, keepdim=True))
    assert stem.stride == (1, 1) and old_stem.stride == (2, 2)
    assert torch.equal(model.features[3].block[0][0].weight, native.features[3].block[0][0].weight)
    assert model.classifier[3].out_features == 10  # the 1000-class head swapped
    colour = build_model(config, image_shape=(3, 32, 32))
    assert torch.equal(colour.features[0][0].weight, old_stem.weight)  # RGB kept as it was


@pytest.mark.slow
def test_weights_saved_from_an_adapted_network_load_back_whole(tmp_path: Path) -> None:
    config = ModelConfig(name="torchvision:mobilenet_v3_small")
    torch.manual_seed(1)
    trained = build_model(config, image_shape=(3, 32, 32))
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "mine.pt")
    with_weights = config.model_copy(update={"weights": str(tmp_path / "mine.pt")})
    loaded = build_model(with_weights, image_shape=(3, 32, 32))
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_weights_file_with_code_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Path("x")}, path)
    with pytest.raises(DataError, match=r"evil\.pt cannot be loaded \(it holds objects other"):
        weights.read_state_dict(path)


# ---------------------------------------------------------------------------------------
# torch.hub: the cache first, a download with a timeout, never a hang


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """An HTTP URL whose server accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/resnet18-f37072fd.pth"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_download_that_gets_no_answer_times_out_in_one_line(
    silent_server: str, tmp_path: Path
) -> None:
    tic = time.monotonic()
    with pytest.raises(DataError, match=r"cannot download .*without internet put the file"):
        weights.fetch_hub_file(silent_server, tmp_path / "cache", timeout=0.5)
    assert time.monotonic() - tic < 10
    assert not list((tmp_path / "cache").glob("*"))  # no partial file left behind


def test_a_download_from_a_closed_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(DataError, match=r"model\.weights: cannot download .*URLError"):
        weights.fetch_hub_file(f"http://127.0.0.1:{port}/x-12345678.pth", tmp_path, timeout=2)


@pytest.mark.slow
def test_hub_weights_come_from_the_cache_without_a_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = get_model_weights("mobilenet_v3_small").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    native = _native("mobilenet_v3_small")
    torch.save(native.state_dict(), cache / Path(url).name)  # as torch.hub stores it
    config = ModelConfig(name="torchvision:mobilenet_v3_small", weights="DEFAULT")
    model = build_model(config, image_shape=(3, 32, 32))
    assert torch.equal(model.classifier[0].weight, native.classifier[0].weight)


def test_an_unknown_hub_weights_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'IMAGENET9K' is not .*IMAGENET1K_V1, DEFAULT"):
        weights.hub_state_dict("resnet18", "IMAGENET9K")
