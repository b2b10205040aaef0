"""What the data layer knows before reading a byte: the datasets, their raw file names and
shapes, and the records that carry raw files and tensors between the steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CIFAR_ARCHIVE",
    "CIFAR_DIR",
    "CIFAR_FILES",
    "CIFAR_MD5",
    "CIFAR_URL",
    "DATASETS",
    "IMAGES_MAGIC",
    "IMAGE_SIZE",
    "LABELS_MAGIC",
    "NUM_CLASSES",
    "RAW_FILES",
    "SPLITS",
    "DatasetInfo",
    "RawData",
    "RawSource",
]

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
IMAGE_SIZE = 28  # pixels per side
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")

# Role -> file name without .gz, as the dataset authors (and torchvision) name them.
RAW_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# CIFAR-10's binary version (1 label byte + 3,072 pixel bytes per record), with the MD5
# its authors publish for the archive (https://www.cs.toronto.edu/~kriz/cifar.html).
# Never the pickled Python version.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_DIR = "cifar-10-batches-bin"  # the archive's folder
CIFAR_FILES: dict[str, str] = {
    **{f"train_batch_{i}": f"data_batch_{i}.bin" for i in range(1, 6)},
    "test_batch": "test_batch.bin",
}


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
