"""Reading and validating raw files: IDX files (the MNIST family, ``.gz`` or not) and the
check of an image file against its label file; pure apart from reading the one file."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch

from deepopt.data.catalogue import IMAGE_SIZE, IMAGES_MAGIC, LABELS_MAGIC, NUM_CLASSES
from deepopt.errors import DataError

__all__ = ["check_pair", "read_bytes", "read_idx"]

_IDX_UBYTE = 0x08  # the IDX data-type byte for unsigned 8-bit integers


def read_bytes(path: Path) -> bytes:
    """The bytes of a raw file, gunzipped when its name ends in ``.gz``; DataError naming
    the file when it is missing, unreadable or not whole gzip."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except EOFError:
        raise DataError(f"{path}: gzip stream is truncated") from None
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
    data = read_bytes(path)
    if not data:
        raise DataError(
            f"{path}: the file is empty (an IDX file starts with a 4-byte magic number)"
        )
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
