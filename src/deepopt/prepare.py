"""The ``prepare`` stage: raw IDX files -> data/prepared/{train,val,test}.pt + meta.json.

Reads params ``seed`` and ``data.*``. The training subset and its validation part follow
the lecture (seeded, stratified; 5,400 / 600 by default); the test set is the full
10,000 images. Same params and raw files give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from deepopt import paths
from deepopt.config import Params
from deepopt.data import (
    SPLITS,
    build_meta,
    file_sha256,
    locate_raw,
    read_raw,
    split_bytes,
    split_raw,
    write_prepared,
)
from deepopt.files import check_writable

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    data = params.data
    check_writable(*(paths.prepared_split_path(name) for name in SPLITS), paths.meta_path())
    source = locate_raw(data.name, Path(data.root))
    raw = read_raw(source)
    splits = split_raw(raw, data.train_subset, data.val_fraction, params.seed)[0]
    blobs = {name: split_bytes(split) for name, split in splits.items()}
    meta = build_meta(
        dataset=data.name,
        seed=params.seed,
        train_subset=data.train_subset,
        val_fraction=data.val_fraction,
        source=source,
        raw_sha256={role: file_sha256(path) for role, path in source.files.items()},
        splits=splits,
        split_sha256={name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()},
    )
    written = write_prepared(blobs, meta)
    return {
        "stage": "prepare",
        "dataset": data.name,
        "source": meta["source"],
        "counts": meta["counts"],
        "mean": meta["mean"],
        "std": meta["std"],
        "outputs": [str(path) for path in written],
    }
