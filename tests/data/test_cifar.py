"""CIFAR-10 from small files generated here in the binary version's layout: reading,
locating, unpacking, preparing, normalizing, and a network on its 3x32x32 images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch
import yaml

from deepopt import cli
from deepopt.config import DataConfig, ModelConfig
from deepopt.data import (
    CIFAR_ARCHIVE,
    CIFAR_FILES,
    extract_cifar_archive,
    find_cifar_files,
    load_prepared,
    locate_raw,
    normalize,
    read_cifar_bin,
    read_raw,
)
from deepopt.errors import DataError
from deepopt.evaluation.figures import misclassified_figure
from deepopt.figures import png_bytes
from deepopt.models import build_model

PER_BATCH = 20  # records per generated batch file (the real ones hold 10,000)


def cifar_records(n: int, seed: int) -> tuple[bytes, torch.Tensor, torch.Tensor]:
    """n records (1 label byte + R, G, B planes of 32x32) and the images/labels they hold."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = (torch.arange(n) % 10).to(torch.uint8)
    rows = torch.cat([labels[:, None], images.reshape(n, -1)], dim=1)
    return rows.numpy().tobytes(), images, labels


def write_cifar(folder: Path, per_batch: int = PER_BATCH) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(CIFAR_FILES.values()):
        (folder / name).write_bytes(cifar_records(per_batch, seed)[0])


def test_a_record_is_a_label_then_the_red_green_and_blue_planes(tmp_path: Path) -> None:
    record = bytearray(3073)
    record[0] = 7
    record[1] = 11  # red, row 0, column 0
    record[1 + 1024 + 32 * 2 + 5] = 22  # green, row 2, column 5
    record[1 + 2048 + 1023] = 33  # blue, last pixel
    (tmp_path / "b.bin").write_bytes(bytes(record) * 2)
    images, labels = read_cifar_bin(tmp_path / "b.bin")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [7, 7]
    assert (int(images[1, 0, 0, 0]), int(images[1, 1, 2, 5]), int(images[1, 2, 31, 31])) == (
        11,
        22,
        33,
    )
    assert int(images.sum()) == 2 * (11 + 22 + 33)


def test_a_batch_file_of_partial_records_or_bad_labels_is_refused(tmp_path: Path) -> None:
    blob = cifar_records(3, 0)[0]
    (tmp_path / "short.bin").write_bytes(blob[:-1])
    with pytest.raises(DataError, match=r"short\.bin: 9218 bytes is not a whole number"):
        read_cifar_bin(tmp_path / "short.bin")
    (tmp_path / "labels.bin").write_bytes(b"\x0c" + blob[1:])  # label 12
    with pytest.raises(DataError, match=r"labels\.bin: label 12 of record 0 is outside 0\.\.9"):
        read_cifar_bin(tmp_path / "labels.bin")


def test_read_raw_concatenates_the_five_training_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path / "raw" / "cifar10" / "cifar-10-batches-bin")
    source = locate_raw("cifar10", tmp_path / "raw", download=False)
    assert source.layout == "cifar" and source.origin == "data.root"
    raw = read_raw(source)
    assert raw.train_images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert raw.test_images.shape == (PER_BATCH, 3, 32, 32)
    _, first, _ = cifar_records(PER_BATCH, 0)
    assert torch.equal(raw.train_images[:PER_BATCH], first)


def test_batch_files_are_found_beside_or_below_the_dataset_folder(tmp_path: Path) -> None:
    assert find_cifar_files(tmp_path) is None
    write_cifar(tmp_path)
    found = find_cifar_files(tmp_path)
    assert found is not None and found["test_batch"] == tmp_path / "test_batch.bin"
    (tmp_path / "data_batch_3.bin").unlink()
    assert find_cifar_files(tmp_path) is None  # all six or nothing


def _archive(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_the_archive_is_unpacked_by_name_and_nothing_else(tmp_path: Path) -> None:
    members = {f"cifar-10-batches-bin/{n}": cifar_records(2, 0)[0] for n in CIFAR_FILES.values()}
    members["cifar-10-batches-bin/readme.html"] = b"<html>"
    members["../escape.bin"] = b"x"
    root = tmp_path / "raw" / "cifar10"
    root.mkdir(parents=True)
    _archive(root / CIFAR_ARCHIVE, members)
    source = locate_raw("cifar10", tmp_path / "raw", download=False)  # the archive is used
    assert read_raw(source).train_images.shape == (10, 3, 32, 32)
    assert sorted(p.name for p in source.directory.iterdir()) == sorted(CIFAR_FILES.values())
    assert not (tmp_path / "raw" / "escape.bin").exists()
    del members["cifar-10-batches-bin/test_batch.bin"]
    _archive(tmp_path / "partial.tar.gz", members)
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-bin/test_batch\.bin"):
        extract_cifar_archive(tmp_path / "partial.tar.gz", tmp_path / "out")


def test_without_files_or_network_the_error_names_the_six_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils

    def no_network(*_: Any, **__: Any) -> None:  # tests never download
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_network)
    with pytest.raises(DataError) as caught:
        locate_raw("cifar10", tmp_path / "raw")
    message = str(caught.value)
    assert "\n" not in message and "the download failed: URLError" in message
    assert all(name in message for name in CIFAR_FILES.values())
    assert not (tmp_path / "raw").exists()  # no empty folders left behind


def test_normalize_keeps_colour_images_channels_first() -> None:
    _, images, _ = cifar_records(8, 3)
    x = normalize(images, 0.5, 0.25)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_prepare_and_a_network_on_cifar_layout_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]
) -> None:
    write_cifar(tmp_path / "raw" / "cifar10", per_batch=40)
    params = {**base_params, "data": {"name": "cifar10", "root": str(tmp_path / "raw")}}
    params["data"].update(train_subset=100, val_fraction=0.2)
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["prepare"]) == 0
    meta = json.loads(Path("data/prepared/meta.json").read_text())
    assert meta["image_shape"] == [3, 32, 32] and meta["counts"] == {
        "train": 80,
        "val": 20,
        "test": 40,
    }
    assert meta["class_names"][0] == "airplane"
    data = load_prepared(DataConfig(**params["data"]), base_params["seed"])
    x = normalize(data.train.images, data.mean, data.std)
    assert x.shape == (80, 3, 32, 32)
    for config in (ModelConfig(conv_channels=(4, 4, 4), dense_units=8), ModelConfig(name="mlp")):
        model = build_model(config, image_shape=(3, 32, 32))
        assert model(x[:4]).shape == (4, 10)


def test_misclassified_figure_shows_colour_images_in_colour() -> None:
    _, images, labels = cifar_records(6, 4)
    log_probs = torch.full((6, 10), -10.0)
    log_probs[:, 9] = 0.0  # everything predicted as class 9: images 0..4 are wrong
    figure = misclassified_figure(images, labels.long(), log_probs, list("abcdefghij"), "c")
    mosaic = figure.axes[0].images[0].get_array()
    assert mosaic.shape[-1] == 3  # an RGB mosaic, not a gray one
    top, left = 12, 7  # the first cell: below its label band, after half a gap
    first = torch.from_numpy(mosaic[top : top + 32, left : left + 32].copy())
    assert torch.equal(first, images[0].permute(1, 2, 0))
    assert png_bytes(figure).startswith(b"\x89PNG")
