"""Reading CIFAR-10's binary version: the batch files (records of 1 label byte and 3,072
pixel bytes) and the six of them inside the archive the authors publish."""

from __future__ import annotations

import math
import tarfile
from collections import Counter
from pathlib import Path

import torch

from deepopt import files
from deepopt.data.catalogue import CIFAR_DIR, CIFAR_FILES, NUM_CLASSES, RawData, RawSource
from deepopt.data.idx import read_bytes
from deepopt.errors import DataError

__all__ = ["extract_cifar_archive", "read_cifar", "read_cifar_bin"]

_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_RECORD = 1 + math.prod(_CIFAR_SHAPE)


def read_cifar_bin(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels uint8 [N] of one CIFAR-10 binary batch file.

    Each record is 1 label byte (0..9) then 3,072 pixel bytes, channels R, G, B each 32
    rows of 32: exactly [3, 32, 32] in C order. DataError when the size is not a whole
    number of records or a label is out of range.
    """
    path = Path(path)
    data = read_bytes(path)
    if not data:
        raise DataError(f"{path}: the file is empty")
    if len(data) % _CIFAR_RECORD:
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


def read_cifar(source: RawSource) -> RawData:
    """The five training batches (concatenated) and the test batch of ``source``.

    All six hold the same number of records (10,000 in CIFAR-10): a file cut at a record
    boundary is still a whole number of records, so only this comparison finds it."""
    names = [f"train_batch_{i}" for i in range(1, 6)]
    parts = [read_cifar_bin(source.files[name]) for name in names]
    test_images, test_labels = read_cifar_bin(source.files["test_batch"])
    counts = {source.files[n]: len(labels) for n, (_, labels) in zip(names, parts, strict=True)}
    counts[source.files["test_batch"]] = len(test_labels)
    usual = Counter(counts.values()).most_common(1)[0][0]
    odd = next((path for path, count in counts.items() if count != usual), None)
    if odd is not None:
        raise DataError(
            f"{odd}: holds {counts[odd]} records but the other batch files {usual} each "
            "(truncated or from another data set?)"
        )
    return RawData(
        train_images=torch.cat([images for images, _ in parts]),
        train_labels=torch.cat([labels for _, labels in parts]),
        test_images=test_images,
        test_labels=test_labels,
    )


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
