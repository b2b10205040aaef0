"""Where the raw files are (data.root, Debian's copy, a download) and reading them into
RawData; downloading is the last resort, with a socket timeout."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from deepopt import paths
from deepopt.data.catalogue import (
    CIFAR_ARCHIVE,
    CIFAR_DIR,
    CIFAR_FILES,
    CIFAR_MD5,
    CIFAR_URL,
    DATASETS,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    RAW_FILES,
    RawData,
    RawSource,
)
from deepopt.data.cifar import extract_cifar_archive, read_cifar
from deepopt.data.idx import check_pair, read_idx
from deepopt.errors import ConfigError, DataError, one_line

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DOWNLOAD_TIMEOUT_S",
    "find_cifar_files",
    "find_idx_files",
    "locate_raw",
    "read_raw",
]

# Debian's package dataset-fashion-mnist installs the four .gz files here. A module
# constant so tests can point it elsewhere (or pass locate_raw(debian_dir=...)).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Per socket operation, seconds: without it urllib waits forever on a stalled mirror.
DOWNLOAD_TIMEOUT_S = 30.0


# What to do about a raw file that is damaged (every reader's DataError ends with it).
_REPLACE = "replace it with an intact copy of the dataset's file"


def read_raw(source: RawSource) -> RawData:
    """The raw files of ``source``, each validated and checked against its partner; a
    DataError names the file, what is wrong with it and that it needs an intact copy."""
    try:
        return _read_raw(source)
    except DataError as err:
        raise DataError(f"{err}; {_REPLACE}") from None


def _read_raw(source: RawSource) -> RawData:
    if source.layout == "cifar":
        return read_cifar(source)
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
        step = "unpacking" if archive.is_file() else "the download"
        why = f"{step} failed: {one_line(err, 200, with_type=True)}"
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
    paths.allow_outputs_under(root)  # downloads and unpacked archives go there
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
            why = f"torchvision's download failed: {one_line(err, 200, with_type=True)}"
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
