"""The data layer on small IDX files written here: reading, locating, splitting, loading."""

from __future__ import annotations

import gzip
import json
import math
import socket
import struct
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepopt import data as data_mod
from deepopt.config import DataConfig
from deepopt.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    RAW_FILES,
    RawSource,
    Split,
    build_meta,
    check_pair,
    find_idx_files,
    load_prepared,
    load_split,
    locate_raw,
    normalize,
    pixel_stats,
    read_idx,
    read_raw,
    split_bytes,
    split_raw,
    stratified_split,
    write_prepared,
)
from deepopt.data import sources as data_sources
from deepopt.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------
# helpers: IDX files as the dataset authors write them


def idx_bytes(tensor: torch.Tensor, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic (0x0803 / 0x0801 by rank), dims, data."""
    dims = tuple(tensor.shape)
    magic = magic if magic is not None else 0x00000800 | len(dims)
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    return header + tensor.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, blob: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        # mtime=0: the same bytes every time
        path.write_bytes(gzip.compress(blob, mtime=0))
    else:
        path.write_bytes(blob)
    return path


def tiny_images(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), generator=gen, dtype=torch.uint8)


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    return (torch.arange(n) % num_classes).to(torch.uint8)


def write_dataset(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True) -> None:
    """The four IDX files of a tiny balanced dataset in ``folder``."""
    parts = {
        "train_images": tiny_images(n_train, seed=1),
        "train_labels": balanced_labels(n_train),
        "test_images": tiny_images(n_test, seed=2),
        "test_labels": balanced_labels(n_test),
    }
    for role, tensor in parts.items():
        write_idx(folder / RAW_FILES[role], idx_bytes(tensor), gz=gz)


# ---------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images, labels = tiny_images(7), balanced_labels(7)
    img_path = write_idx(tmp_path / "img", idx_bytes(images), gz=gz)
    lab_path = write_idx(tmp_path / "lab", idx_bytes(labels), gz=gz)
    read_images = read_idx(img_path, IMAGES_MAGIC)
    assert read_images.dtype == torch.uint8 and read_images.shape == (7, 28, 28)
    assert torch.equal(read_images, images)
    assert torch.equal(read_idx(lab_path, LABELS_MAGIC), labels)


def test_read_idx_rejects_a_non_idx_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match=r"x: magic number 0x504b0304 is not IDX"):
        read_idx(path)


def test_read_idx_rejects_a_non_byte_data_type(tmp_path: Path) -> None:
    # 0x0D = float32 in the IDX spec
    path = write_idx(tmp_path / "floats", struct.pack(">II", 0x00000D01, 1) + bytes(4))
    with pytest.raises(DataError, match=r"floats: IDX data type 0x0d is not 0x08"):
        read_idx(path)


def test_read_idx_rejects_an_unexpected_rank(tmp_path: Path) -> None:
    blob = idx_bytes(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))  # magic 0x0804
    path = write_idx(tmp_path / "rank4", blob)
    with pytest.raises(DataError, match=r"rank4: IDX file with 4 dimensions"):
        read_idx(path)


def test_read_idx_rejects_labels_where_images_are_expected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", idx_bytes(balanced_labels(5)))
    with pytest.raises(DataError, match=r"magic number 0x00000801, expected 0x00000803 \(images"):
        read_idx(path, IMAGES_MAGIC)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_a_truncated_file(tmp_path: Path, gz: bool) -> None:
    blob = idx_bytes(tiny_images(3))
    path = write_idx(tmp_path / "short", blob[:-10], gz=gz)
    with pytest.raises(DataError, match=r"short(\.gz)?: truncated: .*2352 bytes .* only 2342"):
        read_idx(path)


def test_read_idx_rejects_a_truncated_header(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "hdr", struct.pack(">II", IMAGES_MAGIC, 3))
    with pytest.raises(DataError, match=r"hdr: truncated inside the header \(8 of 16 bytes\)"):
        read_idx(path)


def test_read_idx_rejects_extra_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "long", idx_bytes(balanced_labels(5)) + b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"long: 3 extra bytes after the 5 bytes"):
        read_idx(path)


def test_read_idx_names_a_truncated_gzip_file(tmp_path: Path) -> None:
    full = gzip.compress(idx_bytes(tiny_images(20)), mtime=0)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: gzip stream is truncated"):
        read_idx(path)


def test_read_idx_names_a_gz_file_that_is_not_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", idx_bytes(balanced_labels(5)))  # plain, .gz name
    with pytest.raises(DataError, match=r"labels\.gz: not a valid gzip file"):
        read_idx(path)


def test_read_idx_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing: file not found"):
        read_idx(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------
# check_pair / read_raw


def test_check_pair_rejects_count_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path, n_train=30)
    write_idx(tmp_path / RAW_FILES["train_labels"], idx_bytes(balanced_labels(29)), gz=True)
    files = find_idx_files(tmp_path)
    assert files is not None
    with pytest.raises(DataError, match=r"holds 30 images but .*train-labels.* holds 29 labels"):
        read_raw(RawSource(tmp_path, files, "data.root"))


def test_check_pair_rejects_labels_out_of_range(tmp_path: Path) -> None:
    labels = balanced_labels(6)
    labels[4] = 10
    with pytest.raises(DataError, match=r"lab: label 10 at index 4 is outside 0\.\.9"):
        check_pair(tiny_images(6), labels, tmp_path / "img", tmp_path / "lab")


def test_check_pair_rejects_images_that_are_not_28x28(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"img: images are 32x32; expected 28x28"):
        check_pair(tiny_images(4, size=32), balanced_labels(4), tmp_path / "img", tmp_path / "l")


def test_read_raw_rejects_images_that_are_not_28x28_from_files(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    write_idx(tmp_path / RAW_FILES["test_images"], idx_bytes(tiny_images(50, size=32)), gz=True)
    files = find_idx_files(tmp_path)
    assert files is not None
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: images are 32x32"):
        read_raw(RawSource(tmp_path, files, "data.root"))


# ---------------------------------------------------------------------------------------
# locating the raw files


def test_find_idx_files_prefers_plain_and_needs_all_four(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    write_idx(tmp_path / RAW_FILES["train_labels"], idx_bytes(balanced_labels(200)), gz=False)
    files = find_idx_files(tmp_path)
    assert files is not None
    assert files["train_labels"].name == "train-labels-idx1-ubyte"
    assert files["train_images"].name == "train-images-idx3-ubyte.gz"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_idx_files(tmp_path) is None


def test_locate_raw_prefers_data_root_over_debian(tmp_path: Path) -> None:
    write_dataset(tmp_path / "raw" / "fashion-mnist")
    debian = tmp_path / "debian"
    write_dataset(debian)
    source = locate_raw("fashion-mnist", tmp_path / "raw", debian_dir=debian)
    assert (source.directory, source.origin) == (tmp_path / "raw" / "fashion-mnist", "data.root")


def test_locate_raw_falls_back_to_debian_for_fashion_mnist_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "debian"
    write_dataset(debian)
    # locate_raw reads the constant in data.sources; pointing it elsewhere simulates the package
    monkeypatch.setattr(data_sources, "DEBIAN_FASHION_MNIST", debian)
    source = locate_raw("fashion-mnist", tmp_path / "raw")
    assert (source.directory, source.origin) == (debian, "debian")
    with pytest.raises(DataError, match="no kmnist data found"):
        locate_raw("kmnist", tmp_path / "raw", download=False)


def _no_network(self: Any) -> None:
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_locate_raw_without_data_or_network_names_the_four_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    # the network call itself is replaced: tests never download
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", _no_network)
    with pytest.raises(DataError) as caught:
        locate_raw("fashion-mnist", tmp_path / "raw", debian_dir=tmp_path / "no-debian")
    message = str(caught.value)
    assert "\n" not in message
    for stem in RAW_FILES.values():
        assert stem in message
    assert f"into {tmp_path / 'raw' / 'fashion-mnist'}/" in message
    assert "no-debian" in message  # fashion-mnist: also says where Debian's copy goes
    assert "torchvision's download failed" in message
    assert not (tmp_path / "raw" / "fashion-mnist").exists()  # no empty folders left


def test_locate_raw_uses_torchvision_download_with_a_socket_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    timeouts: list[float | None] = []

    def fake_fetch(self: Any) -> None:
        # stands in for the HTTP transfer: the files arrive where torchvision puts them
        timeouts.append(socket.getdefaulttimeout())
        write_dataset(Path(self.raw_folder), gz=False)

    monkeypatch.setattr(torchvision.datasets.KMNIST, "download", fake_fetch)
    before = socket.getdefaulttimeout()
    source = locate_raw("kmnist", tmp_path / "raw", debian_dir=tmp_path / "none")
    assert source.origin == "torchvision"
    assert source.directory == tmp_path / "raw" / "kmnist" / "KMNIST" / "raw"
    assert timeouts == [data_mod.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before
    # a second lookup reuses the download without calling torchvision
    monkeypatch.setattr(torchvision.datasets.KMNIST, "download", _no_network)
    assert locate_raw("kmnist", tmp_path / "raw").directory == source.directory


# ---------------------------------------------------------------------------------------
# stratified_split


def _per_class(labels: torch.Tensor, idx: torch.Tensor) -> list[int]:
    return torch.bincount(labels[idx].long(), minlength=10).tolist()


def test_split_has_the_lecture_sizes_per_class() -> None:
    labels = balanced_labels(60_000)
    train, val = stratified_split(labels, 6000, 0.1, seed=4487)
    assert (train.numel(), val.numel()) == (5400, 600)
    assert _per_class(labels, train) == [540] * 10
    assert _per_class(labels, val) == [60] * 10


def test_split_is_disjoint_sorted_and_in_range() -> None:
    labels = balanced_labels(1000)
    train, val = stratified_split(labels, 300, 0.2, seed=1)
    both = torch.cat([train, val])
    assert both.unique().numel() == both.numel() == 300
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert int(both.min()) >= 0 and int(both.max()) < 1000


def test_split_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    labels = balanced_labels(2000)
    first = stratified_split(labels, 500, 0.1, seed=7)
    again = stratified_split(labels, 500, 0.1, seed=7)
    other = stratified_split(labels, 500, 0.1, seed=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])


def test_split_rounds_imbalanced_classes_by_largest_remainder() -> None:
    # classes of 50, 30, 20 images; a subset of 11 -> quotas 5.5, 3.3, 2.2 -> 6, 3, 2
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20, dtype=torch.uint8)
    train, val = stratified_split(labels, 11, 0.3, seed=0)
    # round(11 * 0.3) = 3 validation images; quotas 6/11*3, 3/11*3, 2/11*3 -> 2, 1, 0
    assert _per_class(labels, val)[:3] == [2, 1, 0]
    assert _per_class(labels, train)[:3] == [4, 2, 2]


def test_split_without_subset_uses_all_images() -> None:
    labels = balanced_labels(500)
    train, val = stratified_split(labels, None, 0.1, seed=3)
    assert (train.numel(), val.numel()) == (450, 50)


def test_split_refuses_a_subset_larger_than_the_data() -> None:
    with pytest.raises(ConfigError, match=r"data\.train_subset: 7000 .* the 6000 training images"):
        stratified_split(balanced_labels(6000), 7000, 0.1, seed=0)


def test_split_refuses_an_empty_validation_part() -> None:
    with pytest.raises(ConfigError, match=r"data\.val_fraction: 0\.01 of 20 images leaves 0"):
        stratified_split(balanced_labels(100), 20, 0.01, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    class_sizes=st.lists(st.integers(0, 40), min_size=2, max_size=10).filter(
        lambda sizes: sum(sizes) >= 20
    ),
    share=st.floats(0.1, 1.0),
    val_fraction=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**31),
)
def test_split_is_proportional_within_one_image_per_class(
    class_sizes: list[int], share: float, val_fraction: float, seed: int
) -> None:
    labels = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(class_sizes)])
    total = sum(class_sizes)
    subset = max(2, round(total * share))
    n_val = math.floor(subset * val_fraction + 0.5)
    if not 1 <= n_val < subset:
        return  # refused with a ConfigError, tested above
    train, val = stratified_split(labels, subset, val_fraction, seed)
    assert train.numel() + val.numel() == subset and val.numel() == n_val
    assert torch.cat([train, val]).unique().numel() == subset
    chosen = _per_class(labels, torch.cat([train, val]))
    for count, size in zip(chosen, class_sizes, strict=False):
        assert abs(count - subset * size / total) < 1
        assert count <= size


@settings(max_examples=60, deadline=None)
@given(
    class_sizes=st.lists(st.integers(0, 300), min_size=2, max_size=10).filter(
        lambda sizes: sum(sizes) >= 2
    ),
    share=st.floats(0.01, 1.0),
    val_fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31),
)
def test_train_and_validation_parts_are_disjoint_and_each_stratified(
    class_sizes: list[int], share: float, val_fraction: float, seed: int
) -> None:
    labels = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(class_sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    subset = max(2, round(len(labels) * share))
    n_val = math.floor(subset * val_fraction + 0.5)
    if not 1 <= n_val < subset:
        with pytest.raises(ConfigError, match=r"data\.val_fraction"):
            stratified_split(labels, subset, val_fraction, seed)
        return
    train, val = stratified_split(labels, subset, val_fraction, seed)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert (train.numel(), val.numel()) == (subset - n_val, n_val)
    val_counts = _per_class(labels, val)
    chosen = [t + v for t, v in zip(_per_class(labels, train), val_counts, strict=True)]
    # The validation part is a stratified sample of the subset: its per-class counts are
    # the subset's shares of n_val within one image.
    for val_count, subset_count in zip(val_counts, chosen, strict=True):
        assert abs(val_count - n_val * subset_count / subset) < 1
        assert val_count <= subset_count


# ---------------------------------------------------------------------------------------
# statistics and normalization


def test_pixel_stats_scale_to_unit_interval() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat(392).reshape(1, 28, 28)  # half 0
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.5)


def test_pixel_stats_are_the_same_whatever_the_thread_count() -> None:
    # meta.json records them: a float reduction's last digits depend on the thread count.
    images = tiny_images(3000)
    previous = torch.get_num_threads()
    try:
        stats = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            stats.add(pixel_stats(images))
    finally:
        torch.set_num_threads(previous)
    assert len(stats) == 1


def test_normalize_gives_float_nchw_with_zero_mean_unit_std() -> None:
    images = tiny_images(64)
    mean, std = pixel_stats(images)
    x = normalize(images, mean, std)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    expected = (images.unsqueeze(1).double() / 255 - mean) / std
    assert torch.allclose(x.double(), expected, atol=1e-5)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std(correction=0)) == pytest.approx(1.0, abs=1e-5)


def test_normalize_refuses_zero_std() -> None:
    with pytest.raises(DataError, match="std must be positive"):
        normalize(tiny_images(2), 0.5, 0.0)


# ---------------------------------------------------------------------------------------
# writing and loading data/prepared/


def _prepare_tiny(
    root: Path, seed: int = 5, subset: int | None = 100, val_fraction: float = 0.2
) -> dict[str, Any]:
    """What prepare.main does, on a tiny dataset under ``root`` (no params file needed)."""
    write_dataset(root / "raw" / "mnist")
    source = locate_raw("mnist", root / "raw", download=False)
    raw = read_raw(source)
    splits, _, _ = split_raw(raw, subset, val_fraction, seed)
    blobs = {name: split_bytes(split) for name, split in splits.items()}
    meta = build_meta(
        dataset="mnist",
        seed=seed,
        train_subset=subset,
        val_fraction=val_fraction,
        source=source,
        raw_sha256={role: "0" * 64 for role in source.files},
        splits=splits,
        split_sha256={name: str(len(blob)) for name, blob in blobs.items()},
    )
    write_prepared(blobs, meta, root=root)
    return meta


def test_split_bytes_are_deterministic() -> None:
    split = Split(tiny_images(10), balanced_labels(10).long())
    assert split_bytes(split) == split_bytes(Split(split.images.clone(), split.labels.clone()))


def test_load_prepared_round_trips(tmp_path: Path) -> None:
    meta = _prepare_tiny(tmp_path)
    data = load_prepared(DataConfig(name="mnist", train_subset=100, val_fraction=0.2), 5, tmp_path)
    assert (data.train.images.shape, data.val.images.shape) == ((80, 28, 28), (20, 28, 28))
    assert data.test.labels.dtype == torch.int64 and data.test.labels.shape == (50,)
    assert data.train.images.dtype == torch.uint8
    assert (data.mean, data.std) == (meta["mean"], meta["std"])
    assert data.class_names == list("0123456789") and data.num_classes == 10
    assert data.meta["class_counts"]["val"] == [2] * 10
    assert len(data.meta["digest"]) == 64


def test_write_prepared_leaves_no_temp_files_and_meta_last(tmp_path: Path) -> None:
    _prepare_tiny(tmp_path)
    folder = tmp_path / "data" / "prepared"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["meta.json", "test.pt", "train.pt", "val.pt"]
    meta_time = (folder / "meta.json").stat().st_mtime_ns
    assert all((folder / f"{s}.pt").stat().st_mtime_ns <= meta_time for s in data_mod.SPLITS)


def test_failed_write_removes_the_old_meta_and_its_temp_file(tmp_path: Path) -> None:
    _prepare_tiny(tmp_path)
    folder = tmp_path / "data" / "prepared"
    (folder / "test.pt").unlink()
    (folder / "test.pt").mkdir()  # os.replace onto a folder fails
    blobs = {name: b"x" for name in data_mod.SPLITS}
    with pytest.raises(DataError, match=r"test\.pt: cannot write"):
        write_prepared(blobs, {"dataset": "mnist"}, root=tmp_path)
    assert not (folder / "meta.json").exists()  # the loader will ask for a re-run
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_load_prepared_says_how_to_create_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"prepared data is missing .*run `deepopt prepare`"):
        load_prepared(DataConfig(), 4487, tmp_path)


@pytest.mark.parametrize(
    ("config", "seed", "message"),
    [
        ({"name": "kmnist"}, 5, "data.name='mnist' but the params have data.name='kmnist'"),
        ({}, 6, "seed=5 but the params have seed=6"),
        ({"train_subset": 90}, 5, "data.train_subset=100 but the params have data.train_subset=90"),
        ({"train_subset": None}, 5, "train_subset=100 but the params have data.train_subset=None"),
        ({"val_fraction": 0.1}, 5, "val_fraction=0.2 but the params have data.val_fraction=0.1"),
    ],
)
def test_load_prepared_rejects_other_params(
    tmp_path: Path, config: dict[str, Any], seed: int, message: str
) -> None:
    _prepare_tiny(tmp_path)
    wanted = DataConfig(**{"name": "mnist", "train_subset": 100, "val_fraction": 0.2, **config})
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_prepared(wanted, seed, tmp_path)


def test_load_split_rejects_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    path.write_bytes(b"not a torch archive")
    with pytest.raises(DataError, match=r"train\.pt: cannot be loaded .*deepopt prepare"):
        load_split(path)


def test_load_split_rejects_wrong_contents(tmp_path: Path) -> None:
    path = tmp_path / "val.pt"
    torch.save({"images": torch.zeros(3, 28, 28), "labels": torch.zeros(3)}, path)  # float
    with pytest.raises(DataError, match=r"val\.pt: holds \{'images': float32 .*; expected .*uint8"):
        load_split(path)


def test_load_prepared_rejects_meta_that_disagrees_with_the_files(tmp_path: Path) -> None:
    _prepare_tiny(tmp_path)
    meta_file = tmp_path / "data" / "prepared" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["counts"]["val"] = 21
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"val\.pt: holds 20 images but meta\.json records 21"):
        load_prepared(DataConfig(name="mnist", train_subset=100, val_fraction=0.2), 5, tmp_path)
