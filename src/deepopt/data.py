"""The data layer: raw IDX files in, prepared uint8 tensors out, and back into training.

The middle is pure: ``read_idx`` parses and validates one IDX file, ``check_pair`` checks
an image file against its label file, ``stratified_split`` draws the lecture's seeded,
stratified subset and its validation part, ``build_meta`` describes the result and
``normalize`` turns uint8 images into the network's float input. The edges are
``locate_raw`` (where the raw files are, downloading only as a last resort),
``write_prepared`` (atomic writes, meta.json last) and ``load_prepared`` (what training
calls; it refuses files prepared with other params).

Prepared files hold raw uint8 pixels; normalization is applied at load time with the
training part's mean and std recorded in meta.json, so changing it never re-prepares.

CIFAR-10 (``data.name: cifar10``) comes in its *binary* version, never the pickled Python
one: ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``, each 10,000
records of 1 label byte and 3,072 pixel bytes (1,024 red, then green, then blue, rows top
to bottom), read by ``read_cifar_bin`` straight into uint8 [N, 3, 32, 32]. The prepared
images keep that channels-first shape (the grayscale sets stay [N, 28, 28]) and one mean
and std over all pixels of all channels normalize them, as for the grayscale sets.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import socket
import struct
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from deepopt import files, paths
from deepopt.config import DataConfig
from deepopt.errors import ConfigError, DataError

__all__ = [
    "CIFAR_ARCHIVE",
    "CIFAR_FILES",
    "CIFAR_MD5",
    "CIFAR_URL",
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DOWNLOAD_TIMEOUT_S",
    "IMAGES_MAGIC",
    "IMAGE_SIZE",
    "LABELS_MAGIC",
    "NUM_CLASSES",
    "RAW_FILES",
    "SPLITS",
    "DatasetInfo",
    "PreparedData",
    "RawData",
    "RawSource",
    "Split",
    "build_meta",
    "check_meta_matches",
    "check_pair",
    "class_counts",
    "extract_cifar_archive",
    "file_sha256",
    "find_cifar_files",
    "find_idx_files",
    "image_shape",
    "load_prepared",
    "load_split",
    "locate_raw",
    "normalize",
    "pixel_stats",
    "read_cifar_bin",
    "read_idx",
    "read_raw",
    "split_bytes",
    "split_raw",
    "stratified_split",
    "write_prepared",
]

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_IDX_UBYTE = 0x08  # the IDX data-type byte for unsigned 8-bit integers
IMAGE_SIZE = 28  # pixels per side
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")

# Debian's package dataset-fashion-mnist installs the four .gz files here. A module
# constant so tests can point it elsewhere (or pass locate_raw(debian_dir=...)).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Per socket operation, seconds: without it urllib waits forever on a stalled mirror.
DOWNLOAD_TIMEOUT_S = 30.0

# Role -> file name without .gz, as the dataset authors (and torchvision) name them.
RAW_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# CIFAR-10's binary version (1 label byte + 3,072 pixel bytes per record), with the MD5
# its authors publish for the archive (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_DIR = "cifar-10-batches-bin"  # the archive's folder
CIFAR_FILES: dict[str, str] = {
    **{f"train_batch_{i}": f"data_batch_{i}.bin" for i in range(1, 6)},
    "test_batch": "test_batch.bin",
}
_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_RECORD = 1 + math.prod(_CIFAR_SHAPE)


@dataclass(frozen=True)
class DatasetInfo:
    class_names: tuple[str, ...]
    # The torchvision.datasets class that can download it; also the folder it downloads
    # into (<data.root>/<name>/<class>/raw/). CIFAR-10 is fetched in its binary version.
    torchvision_class: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(tuple("0123456789"), "MNIST"),
    "fashion-mnist": DatasetInfo(
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        "FashionMNIST",
    ),
    # Kuzushiji-MNIST: one cursive hiragana per class, romanized as torchvision does.
    "kmnist": DatasetInfo(("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), "KMNIST"),
    "cifar10": DatasetInfo(
        (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        "CIFAR10",
    ),
}


@dataclass(frozen=True)
class RawSource:
    """Where the four raw IDX files were found, and how."""

    directory: Path
    files: dict[str, Path]  # role (RAW_FILES or CIFAR_FILES key) -> file
    origin: str  # "data.root", "debian" or "torchvision"
    layout: str = "idx"  # "idx" (the MNIST family) or "cifar" (CIFAR-10's binary batches)


@dataclass(frozen=True, eq=False)
class RawData:
    train_images: torch.Tensor  # uint8 [60000, 28, 28] for the MNIST family, [50000, 3, 32, 32]
    train_labels: torch.Tensor  # uint8 [60000]
    test_images: torch.Tensor  # uint8 [10000, 28, 28]
    test_labels: torch.Tensor  # uint8 [10000]


@dataclass(frozen=True, eq=False)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28] (or [N, 3, 32, 32]), raw pixel values 0..255
    labels: torch.Tensor  # int64 [N], class indices 0..9


@dataclass(frozen=True, eq=False)
class PreparedData:
    train: Split
    val: Split
    test: Split
    meta: dict[str, Any]
    mean: float  # of the training part's pixels scaled to [0, 1]
    std: float
    class_names: list[str]
    num_classes: int


# ---------------------------------------------------------------------------------------
# Reading and validating IDX files (pure apart from reading the one file)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except EOFError:
        raise DataError(f"{path}: gzip stream is truncated (copy or download it again)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: not a valid gzip file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def read_idx(path: Path, expected_magic: int | None = None) -> torch.Tensor:
    """The uint8 tensor stored in an IDX file (``.gz`` or not), its shape from the header.

    Checks the magic number (0x00000803 images, 0x00000801 labels; ``expected_magic``
    requires one of them), the data-type byte 0x08 and that the file holds exactly the
    bytes its header describes. Every problem is a DataError naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header (4+ bytes)")
    if data[:2] != b"\x00\x00":
        raise DataError(
            f"{path}: magic number 0x{data[:4].hex()} is not IDX "
            f"(expected 0x{IMAGES_MAGIC:08x} for images or 0x{LABELS_MAGIC:08x} for labels)"
        )
    if data[2] != _IDX_UBYTE:
        raise DataError(
            f"{path}: IDX data type 0x{data[2]:02x} is not 0x08 (unsigned byte) as the "
            "MNIST-style datasets use"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DataError(
            f"{path}: IDX file with {data[3]} dimensions (magic 0x{magic:08x}); expected "
            f"0x{IMAGES_MAGIC:08x} (images, 3 dimensions) or 0x{LABELS_MAGIC:08x} (labels, 1)"
        )
    if expected_magic is not None and magic != expected_magic:
        wanted = "images" if expected_magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} ({wanted})"
        )
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated inside the header ({len(data)} of {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = math.prod(dims)
    present = len(data) - header_len
    if present < expected:
        raise DataError(
            f"{path}: truncated: the header promises {'x'.join(map(str, dims))} = "
            f"{expected} bytes of data but only {present} are present"
        )
    if present > expected:
        raise DataError(
            f"{path}: {present - expected} extra bytes after the {expected} bytes of data "
            f"its header ({'x'.join(map(str, dims))}) describes"
        )
    if expected == 0:
        return torch.empty(dims, dtype=torch.uint8)
    # bytearray: a writable copy, so the tensor owns its memory (no header bytes).
    payload = bytearray(memoryview(data)[header_len:])
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(dims)


def check_pair(
    images: torch.Tensor,
    labels: torch.Tensor,
    images_path: Path,
    labels_path: Path,
    num_classes: int = NUM_CLASSES,
) -> None:
    """Refuse an image/label pair that does not fit: counts, 28x28 images, labels 0..9."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        size = "x".join(str(d) for d in images.shape[1:])
        raise DataError(f"{images_path}: images are {size}; expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if labels.dim() != 1:
        raise DataError(f"{labels_path}: labels have {labels.dim()} dimensions; expected 1")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; they must agree"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: holds no images")
    bad = (labels.to(torch.int64) >= num_classes).nonzero()
    if bad.numel():
        index = int(bad[0, 0])
        raise DataError(
            f"{labels_path}: label {int(labels[index])} at index {index} is outside "
            f"0..{num_classes - 1} ({int(bad.shape[0])} such labels)"
        )


def read_cifar_bin(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels uint8 [N] of one CIFAR-10 binary batch file.

    Each record is 1 label byte (0..9) then 3,072 pixel bytes, channels R, G, B each 32
    rows of 32: exactly [3, 32, 32] in C order. DataError when the size is not a whole
    number of records or a label is out of range.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data or len(data) % _CIFAR_RECORD:
        raise DataError(
            f"{path}: {len(data)} bytes is not a whole number of CIFAR-10 records "
            f"({_CIFAR_RECORD} bytes each: 1 label + 3x32x32 pixels)"
        )
    records = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].clone()
    bad = (labels >= NUM_CLASSES).nonzero()
    if bad.numel():
        index = int(bad[0, 0])
        raise DataError(
            f"{path}: label {int(labels[index])} of record {index} is outside 0..9 "
            "(is this the binary version, cifar-10-batches-bin?)"
        )
    images = records[:, 1:].reshape(-1, *_CIFAR_SHAPE).clone()  # own memory, no label bytes
    return images, labels


def _read_cifar(source: RawSource) -> RawData:
    parts = [read_cifar_bin(source.files[f"train_batch_{i}"]) for i in range(1, 6)]
    test_images, test_labels = read_cifar_bin(source.files["test_batch"])
    return RawData(
        train_images=torch.cat([images for images, _ in parts]),
        train_labels=torch.cat([labels for _, labels in parts]),
        test_images=test_images,
        test_labels=test_labels,
    )


def image_shape(images: torch.Tensor) -> tuple[int, int, int]:
    """(channels, height, width) of uint8 images [N, H, W] (one channel) or [N, C, H, W]."""
    if images.dim() == 3:
        return (1, int(images.shape[1]), int(images.shape[2]))
    channels, height, width = (int(n) for n in images.shape[1:])
    return (channels, height, width)


def read_raw(source: RawSource) -> RawData:
    """The raw files of ``source``, each validated and checked against its partner."""
    if source.layout == "cifar":
        return _read_cifar(source)
    tensors = {
        role: read_idx(path, IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC)
        for role, path in source.files.items()
    }
    for part in ("train", "test"):
        check_pair(
            tensors[f"{part}_images"],
            tensors[f"{part}_labels"],
            source.files[f"{part}_images"],
            source.files[f"{part}_labels"],
        )
    return RawData(
        train_images=tensors["train_images"],
        train_labels=tensors["train_labels"],
        test_images=tensors["test_images"],
        test_labels=tensors["test_labels"],
    )


# ---------------------------------------------------------------------------------------
# Finding the raw files


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (plain preferred over .gz), or None if any is
    missing."""
    found: dict[str, Path] = {}
    for role, stem in RAW_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found[role] = path
    return found


def find_cifar_files(directory: Path) -> dict[str, Path] | None:
    """The six CIFAR-10 binary batch files in ``directory`` or in its cifar-10-batches-bin/
    (as the archive unpacks), or None if any is missing."""
    for folder in (directory, directory / CIFAR_DIR):
        found = {role: folder / name for role, name in CIFAR_FILES.items()}
        if all(path.is_file() for path in found.values()):
            return found
    return None


def extract_cifar_archive(archive: Path, directory: Path) -> Path:
    """Unpack the six batch files of CIFAR-10's binary archive into ``directory``/
    cifar-10-batches-bin/ (only those regular members, by name: no path from the archive
    is trusted); the folder. Each file is written whole or not at all."""
    target = directory / CIFAR_DIR
    wanted = {f"{CIFAR_DIR}/{name}" for name in CIFAR_FILES.values()}
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name in wanted}
        absent = sorted(wanted - set(members))
        if absent:
            raise DataError(f"{archive}: not CIFAR-10's binary archive (lacks {absent[0]})")
        for name, member in sorted(members.items()):
            stream = tar.extractfile(member)
            assert stream is not None  # a regular file
            with stream:
                files.write_bytes(target / Path(name).name, stream.read())
    return target


def _download_cifar(directory: Path) -> None:
    """CIFAR-10's binary archive via torchvision's downloader (MD5 checked), unpacked into
    ``directory``/cifar-10-batches-bin/; the archive is removed afterwards."""
    from torchvision.datasets.utils import download_url  # lazy: only this last resort

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_url(CIFAR_URL, str(directory), filename=CIFAR_ARCHIVE, md5=CIFAR_MD5)
    finally:
        socket.setdefaulttimeout(previous)
    archive = directory / CIFAR_ARCHIVE
    extract_cifar_archive(archive, directory)
    os.unlink(archive)


def _locate_cifar(root: Path, download: bool) -> RawSource:
    """CIFAR-10's binary batches: <root>/cifar10/ (or its cifar-10-batches-bin/), its
    archive there, or a download of the archive there."""
    own = Path(root) / "cifar10"
    found = find_cifar_files(own)
    if found is not None:
        return RawSource(found["test_batch"].parent, found, "data.root", layout="cifar")
    archive = own / CIFAR_ARCHIVE
    why = "download disabled"
    created = [d for d in (own, *own.parents) if not d.exists()]
    try:
        if archive.is_file():
            extract_cifar_archive(archive, own)
            why = "its archive held no batch files"
        elif download:
            _download_cifar(own)
            why = "the download left no files"
    except Exception as err:  # any failure (no network, timeout, bad archive) ends below
        why = f"{'unpacking' if archive.is_file() else 'the download'} failed: {_one_line(err)}"
    found = find_cifar_files(own)
    if found is not None:
        origin = "data.root" if archive.is_file() else "torchvision"
        return RawSource(found["test_batch"].parent, found, origin, layout="cifar")
    for folder in created:  # innermost first; leave no empty folders behind
        with contextlib.suppress(OSError):
            folder.rmdir()
    raise DataError(
        f"no cifar10 data found: put the binary version's {', '.join(CIFAR_FILES.values())} "
        f"(or {CIFAR_ARCHIVE}) into {own}/; {why}"
    )


def _download_torchvision(name: str, directory: Path) -> None:
    """Let torchvision fetch the dataset into ``directory``/<class>/raw/ (needs internet)."""
    import torchvision.datasets  # lazy: only this last resort needs it

    dataset_class = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Downloads all four files (or none if present); loading the training part is a
        # side effect of the constructor we accept.
        dataset_class(root=str(directory), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def locate_raw(
    name: str, root: Path, debian_dir: Path | None = None, download: bool = True
) -> RawSource:
    """Where the raw files of dataset ``name`` are, looked up in this order:

    1. ``<root>/<name>/`` holding the four IDX files (.gz or not) (cifar10: see
       ``_locate_cifar``);
    2. for fashion-mnist, Debian's copy in ``debian_dir`` (default DEBIAN_FASHION_MNIST);
    3. torchvision's download into ``<root>/<name>/<Class>/raw/`` (reused when already
       there; downloading needs internet and each socket operation times out).

    When none works: a DataError saying which four files to put where.
    """
    if name not in DATASETS:
        raise ConfigError(f"data.name: {name!r} is not one of {', '.join(DATASETS)}")
    if name == "cifar10":
        return _locate_cifar(root, download)
    own = Path(root) / name
    files = find_idx_files(own)
    if files is not None:
        return RawSource(own, files, "data.root")
    debian = DEBIAN_FASHION_MNIST if debian_dir is None else Path(debian_dir)
    if name == "fashion-mnist":
        files = find_idx_files(debian)
        if files is not None:
            return RawSource(debian, files, "debian")
    downloaded = own / DATASETS[name].torchvision_class / "raw"
    why = "download disabled"
    if download:
        created = [d for d in (downloaded, *downloaded.parents) if not d.exists()]
        try:
            if find_idx_files(downloaded) is None:
                _download_torchvision(name, own)
            why = "torchvision's download left no files"
        except Exception as err:  # any failure (no network, timeout, bad mirror) ends below
            why = f"torchvision's download failed: {_one_line(err)}"
        files = find_idx_files(downloaded)
        if files is not None:
            return RawSource(downloaded, files, "torchvision")
        for folder in created:  # innermost first; leave no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
    wanted = ", ".join(RAW_FILES.values())
    debian_hint = (
        f" (or install Debian's dataset-fashion-mnist into {debian})"
        if name == "fashion-mnist"
        else ""
    )
    raise DataError(
        f"no {name} data found: put the four IDX files {wanted} (each .gz or not) "
        f"into {own}/{debian_hint}; {why}"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The lecture's protocol: a seeded, stratified subset and its validation part (pure)


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder).

    Each part gets floor(total * w / sum); the units left over go to the largest
    fractional remainders, ties to the lowest index. Exact integer arithmetic, so the
    parts sum to ``total`` and never exceed their weight when total <= sum(weights).
    """
    weight_sum = sum(weights)
    if weight_sum == 0:
        return [0] * len(weights)
    parts = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    left = total - sum(parts)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        parts[index] += 1
    return parts


def stratified_split(
    labels: torch.Tensor, subset: int | None, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a seeded, stratified subset of ``labels`` and its held-out
    validation part, each sorted ascending and disjoint.

    Rounding: the subset (``subset`` images; None = all) is shared among the classes in
    proportion to their counts, and round-half-up(subset * val_fraction) validation images
    among the classes in proportion to their subset shares, both by largest remainder
    (ties to the lower class index). With the balanced 60,000 and 6,000 / 0.1 that is
    600 per class, 60 of them for validation: 5,400 / 600.
    Which images are drawn depends only on ``seed`` (one torch.Generator, classes in order).
    """
    labels = labels.to(torch.int64)
    available = int(labels.shape[0])
    total = available if subset is None else subset
    if total > available:
        raise ConfigError(
            f"data.train_subset: {subset} is more than the {available} training images "
            f"available; use at most {available}, or null for all"
        )
    if total < 1:
        raise ConfigError(f"data.train_subset: {subset} must be at least 1")
    n_val = math.floor(total * val_fraction + 0.5)
    if not 1 <= n_val < total:
        raise ConfigError(
            f"data.val_fraction: {val_fraction} of {total} images leaves {n_val} for "
            f"validation and {total - n_val} for training; both must be at least 1"
        )
    num_classes = int(labels.max()) + 1 if available else 0
    per_class = torch.bincount(labels, minlength=num_classes).tolist()
    subset_counts = _apportion(total, per_class)
    val_counts = _apportion(n_val, subset_counts)
    generator = torch.Generator().manual_seed(seed)
    train_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for cls, (take, n_cls_val) in enumerate(zip(subset_counts, val_counts, strict=True)):
        members = (labels == cls).nonzero().flatten()  # ascending file order
        chosen = members[torch.randperm(members.numel(), generator=generator)[:take]]
        val_parts.append(chosen[:n_cls_val])
        train_parts.append(chosen[n_cls_val:])
    train_idx = torch.cat(train_parts).sort().values
    val_idx = torch.cat(val_parts).sort().values
    return train_idx, val_idx


def split_raw(
    raw: RawData, subset: int | None, val_fraction: float, seed: int
) -> tuple[dict[str, Split], torch.Tensor, torch.Tensor]:
    """The prepared splits (train, val, test) of ``raw`` and the train and val indices into
    its training images: ``stratified_split``'s subset, labels as int64."""
    train_index, val_index = stratified_split(raw.train_labels, subset, val_fraction, seed)
    splits = {
        "train": Split(raw.train_images[train_index], raw.train_labels[train_index].long()),
        "val": Split(raw.train_images[val_index], raw.train_labels[val_index].long()),
        "test": Split(raw.test_images, raw.test_labels.long()),
    }
    return splits, train_index, val_index


def class_counts(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> list[int]:
    counts: list[int] = torch.bincount(labels.to(torch.int64), minlength=num_classes).tolist()
    return counts


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of uint8 pixels scaled to [0, 1].

    From exact integer sums over a histogram, rounded once: the same values (and
    meta.json bytes) whatever the thread count, which changes the order, and with it the
    last digits, of a float reduction.
    """
    counts = torch.bincount(images.flatten(), minlength=256).tolist()  # pixels per value
    count = sum(counts)
    total = sum(value * n for value, n in enumerate(counts))
    squares = sum(value * value * n for value, n in enumerate(counts))
    variance = Fraction(count * squares - total * total, (255 * count) ** 2)
    return total / (255 * count), math.sqrt(variance)


def normalize(images_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """float32 [N, 1, 28, 28] network input (x / 255 - mean) / std from uint8 [N, 28, 28]
    (or [N, C, H, W] from uint8 [N, C, H, W], e.g. CIFAR-10's [N, 3, 32, 32]).

    Written as (x - 255 mean) / (255 std): one conversion and two in-place passes.
    """
    if not std > 0.0:
        raise DataError(f"normalize: std must be positive, got {std}")
    grayscale = images_uint8.dim() == 3
    x = (images_uint8.unsqueeze(1) if grayscale else images_uint8).to(torch.float32)
    return x.sub_(255.0 * mean).div_(255.0 * std)


def build_meta(
    *,
    dataset: str,
    seed: int,
    train_subset: int | None,
    val_fraction: float,
    source: RawSource,
    raw_sha256: Mapping[str, str],
    splits: Mapping[str, Split],
    split_sha256: Mapping[str, str],
) -> dict[str, Any]:
    """Everything meta.json records about a prepared dataset (pure).

    ``digest`` identifies the prepared data as a whole (a hash of the three split files'
    hashes): training keys its checkpoints and tags its runs with it.
    """
    mean, std = pixel_stats(splits["train"].images)
    digest_input = "".join(f"{name}:{split_sha256[name]}\n" for name in SPLITS)
    return {
        "dataset": dataset,
        "digest": hashlib.sha256(digest_input.encode()).hexdigest(),
        "split_sha256": {name: split_sha256[name] for name in SPLITS},
        "source": str(source.directory),
        "source_origin": source.origin,
        "raw_files": {
            role: {"file": path.name, "sha256": raw_sha256[role]}
            for role, path in source.files.items()
        },
        # The params that shaped the split; load_prepared compares them with params.yaml.
        "params": {"seed": seed, "train_subset": train_subset, "val_fraction": val_fraction},
        "counts": {name: int(split.labels.shape[0]) for name, split in splits.items()},
        "class_counts": {name: class_counts(split.labels) for name, split in splits.items()},
        "mean": mean,
        "std": std,
        "pixel_scale": "uint8 / 255; mean and std of the train split, not applied",
        "class_names": list(DATASETS[dataset].class_names),
        "num_classes": NUM_CLASSES,
        "image_shape": list(splits["train"].images.shape[1:]),  # [28, 28] or [3, 32, 32]
    }


# ---------------------------------------------------------------------------------------
# Writing and loading data/prepared/


def split_bytes(split: Split) -> bytes:
    """The torch.save bytes of a split. Saved through a buffer, not the file: torch.save
    names the archive after the file, and the temp file's name would change the bytes."""
    buffer = io.BytesIO()
    torch.save(
        {"images": split.images.contiguous(), "labels": split.labels.to(torch.int64)}, buffer
    )
    return buffer.getvalue()


def write_prepared(
    split_blobs: Mapping[str, bytes], meta: Mapping[str, Any], root: Path = Path(".")
) -> list[Path]:
    """Write the three split files (``split_bytes`` of each) and then meta.json, each
    atomically; the paths written.

    The old meta.json goes first, so an interrupted run leaves no meta.json and
    load_prepared asks for a re-run instead of pairing new splits with old metadata.
    """
    meta_file = root / paths.meta_path()
    written: list[Path] = []
    path = meta_file
    try:
        meta_file.unlink(missing_ok=True)
        for name in SPLITS:
            path = root / paths.prepared_split_path(name)
            files.write_bytes(path, split_blobs[name])
            written.append(path)
        path = meta_file
        files.write_json(meta_file, meta)
    except OSError as err:
        raise DataError(f"{path}: cannot write ({err.strerror or err})") from None
    written.append(meta_file)
    return written


_RERUN = "run `deepopt prepare` or `dvc repro prepare`"


def load_split(path: Path) -> Split:
    """One prepared split, memory-mapped (so 60,000 images load in milliseconds)."""
    try:
        content = torch.load(path, weights_only=True, mmap=True)
    except FileNotFoundError:
        raise DataError(f"{path}: prepared data is missing; {_RERUN}") from None
    except Exception as err:  # torch raises several types for a corrupt archive
        problem = _one_line(err)
        if "Weights only load failed" in problem:  # torch's text suggests the unsafe way out
            problem = "it holds objects other than tensors and plain data; refused unread"
        raise DataError(f"{path}: cannot be loaded ({problem}); {_RERUN}") from None
    images = content.get("images") if isinstance(content, dict) else None
    labels = content.get("labels") if isinstance(content, dict) else None
    if (
        not isinstance(images, torch.Tensor)
        or not isinstance(labels, torch.Tensor)
        or images.dtype != torch.uint8
        or labels.dtype != torch.int64
        or not (
            tuple(images.shape[1:]) == (IMAGE_SIZE, IMAGE_SIZE)
            or (images.dim() == 4 and min(images.shape[1:]) > 0)
        )
        or labels.shape != images.shape[:1]
    ):
        raise DataError(
            f"{path}: expected {{'images': uint8 [N, 28, 28] or [N, C, H, W], "
            f"'labels': int64 [N]}}; {_RERUN}"
        )
    return Split(images=images, labels=labels)


def check_meta_matches(meta: Mapping[str, Any], data: DataConfig, seed: int) -> None:
    """Refuse prepared data made with another dataset, seed, subset or validation fraction."""
    recorded = meta.get("params", {})
    pairs = [
        ("data.name", meta.get("dataset"), data.name),
        ("seed", recorded.get("seed"), seed),
        ("data.train_subset", recorded.get("train_subset"), data.train_subset),
        ("data.val_fraction", recorded.get("val_fraction"), data.val_fraction),
    ]
    for key, prepared, wanted in pairs:
        if prepared != wanted:
            raise DataError(
                f"{paths.meta_path()}: data was prepared with {key}={prepared!r} but the "
                f"params have {key}={wanted!r}; {_RERUN}"
            )


def load_prepared(params_data: DataConfig, seed: int, root: Path = Path(".")) -> PreparedData:
    """The prepared splits for these params (DataError if missing or from other params)."""
    meta_file = root / paths.meta_path()
    split_files = {name: root / paths.prepared_split_path(name) for name in SPLITS}
    missing = [str(p) for p in (meta_file, *split_files.values()) if not p.is_file()]
    if missing:
        raise DataError(f"prepared data is missing ({', '.join(missing)}); {_RERUN}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{meta_file}: cannot be read ({_one_line(err)}); {_RERUN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: expected a JSON object; {_RERUN}")
    check_meta_matches(meta, params_data, seed)
    splits = {name: load_split(path) for name, path in split_files.items()}
    for name, split in splits.items():
        recorded = meta.get("counts", {}).get(name)
        if recorded != split.labels.shape[0]:
            raise DataError(
                f"{split_files[name]}: holds {split.labels.shape[0]} images but meta.json "
                f"records {recorded}; {_RERUN}"
            )
        shape = meta.get("image_shape")
        if shape is not None and list(split.images.shape[1:]) != shape:
            raise DataError(
                f"{split_files[name]}: holds images of shape {list(split.images.shape[1:])} "
                f"but meta.json records {shape}; {_RERUN}"
            )
    try:
        mean, std = float(meta["mean"]), float(meta["std"])
        class_names = [str(c) for c in meta["class_names"]]
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{meta_file}: incomplete ({_one_line(err)}); {_RERUN}") from None
    return PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        meta=meta,
        mean=mean,
        std=std,
        class_names=class_names,
        num_classes=num_classes,
    )
