"""The prepared data in data/prepared/: describing it (meta.json), writing it atomically and
loading it back for training, refusing files prepared with other params."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepopt import files, paths
from deepopt.config import DataConfig
from deepopt.data.catalogue import DATASETS, IMAGE_SIZE, NUM_CLASSES, SPLITS, RawSource
from deepopt.data.sources import locate_raw, read_raw
from deepopt.data.split import Split, class_counts, pixel_stats, split_raw
from deepopt.errors import DataError, one_line

__all__ = [
    "Preparation",
    "PreparedData",
    "build_meta",
    "check_meta",
    "check_meta_matches",
    "file_sha256",
    "load_prepared",
    "load_split",
    "prepare",
    "split_bytes",
    "write_prepared",
]


# Prepared files hold raw uint8 pixels; normalization is applied at load time with the
# training part's mean and std recorded in meta.json, so changing it never re-prepares.
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
        content = files.load_torch(path, mmap=True)
    except FileNotFoundError:
        raise DataError(f"{path}: prepared data is missing; {_RERUN}") from None
    except files.UnreadableFileError as err:
        raise DataError(f"{path}: cannot be loaded ({err.problem}); {_RERUN}") from None
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
            f"{path}: holds {_describe(content)}; expected {{'images': uint8 [N, 28, 28] or "
            f"[N, C, H, W], 'labels': int64 [N]}}; {_RERUN}"
        )
    return Split(images=images, labels=labels)


def _describe(content: Any) -> str:
    """What a loaded split file holds, in a few words (for a message)."""
    if not isinstance(content, dict):
        return f"a {type(content).__name__}"

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
        return type(value).__name__

    parts = [f"{key!r}: {one(value)}" for key, value in list(content.items())[:4]]
    return "{" + ", ".join(parts) + "}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# meta.json's keys that loading reads, each with its test and what it must be.
_META_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "digest": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest"),
    "params": (
        lambda v: (
            isinstance(v, dict)
            and _is_int(v.get("seed"))
            and (v.get("train_subset") is None or _is_int(v.get("train_subset")))
            and _is_number(v.get("val_fraction"))
        ),
        "{seed, train_subset, val_fraction}",
    ),
    "counts": (
        lambda v: isinstance(v, dict) and all(_is_int(v.get(name)) for name in SPLITS),
        "{train, val, test} image counts",
    ),
    "mean": (_is_number, "a finite number"),
    "std": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "class_names": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of names",
    ),
    "image_shape": (
        lambda v: v is None or (isinstance(v, list) and all(_is_int(n) and n > 0 for n in v)),
        "a list of sizes",
    ),
}


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_KINDS[type(None)] = "null"


def check_meta(meta: Any, meta_file: Path) -> dict[str, Any]:
    """``meta`` as read from ``meta_file`` if it has what loading reads, else DataError."""
    if not isinstance(meta, dict):
        kind = _JSON_KINDS.get(type(meta), type(meta).__name__)
        raise DataError(f"{meta_file}: holds a JSON {kind}, expected an object; {_RERUN}")
    for key, (valid, what) in _META_KEYS.items():
        if key not in meta and key == "image_shape":
            continue
        if key not in meta:
            raise DataError(f"{meta_file}: has no '{key}' ({what}); {_RERUN}")
        if not valid(meta[key]):
            shown = one_line(repr(meta[key]), 60)
            raise DataError(f"{meta_file}: '{key}' is {shown}, expected {what}; {_RERUN}")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise DataError(
            f"{meta_file}: {len(meta['class_names'])} class_names for num_classes "
            f"{meta['num_classes']}; {_RERUN}"
        )
    return meta


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
        text = meta_file.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{meta_file}: cannot be read (the file is empty); {_RERUN}")
        meta = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{meta_file}: cannot be read ({one_line(err, 200, with_type=True)}); {_RERUN}"
        ) from None
    check_meta_matches(check_meta(meta, meta_file), params_data, seed)
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
    return _prepared_data(splits, meta)


def _prepared_data(splits: Mapping[str, Split], meta: dict[str, Any]) -> PreparedData:
    return PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        meta=meta,
        mean=float(meta["mean"]),
        std=float(meta["std"]),
        class_names=[str(c) for c in meta["class_names"]],
        num_classes=int(meta["num_classes"]),
    )


@dataclass(frozen=True)
class Preparation:
    """What ``deepopt prepare`` makes of the raw files, in memory: each split file's bytes,
    and the data as the stages load it back (meta.json is ``data.meta``)."""

    source: RawSource
    blobs: dict[str, bytes]  # split name -> the bytes of data/prepared/<split>.pt
    data: PreparedData
    train_index: torch.Tensor  # into the raw training images
    val_index: torch.Tensor


def prepare(
    data: DataConfig, seed: int, root: Path = Path("."), download: bool = True
) -> Preparation:
    """The prepared splits of ``data`` (seeded, stratified) from its raw files under
    ``root``: the prepare stage writes them, the benchmark keeps them in memory."""
    source = locate_raw(data.name, root / data.root, download=download)
    splits, train_index, val_index = split_raw(
        read_raw(source), data.train_subset, data.val_fraction, seed
    )
    blobs = {name: split_bytes(split) for name, split in splits.items()}
    meta = build_meta(
        dataset=data.name,
        seed=seed,
        train_subset=data.train_subset,
        val_fraction=data.val_fraction,
        source=source,
        raw_sha256={role: file_sha256(path) for role, path in source.files.items()},
        splits=splits,
        split_sha256={name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()},
    )
    return Preparation(source, blobs, _prepared_data(splits, meta), train_index, val_index)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
