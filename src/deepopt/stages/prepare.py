"""The ``prepare`` stage: raw IDX/CIFAR files -> data/prepared/{train,val,test}.pt and
meta.json (seeded, stratified: 5,400 / 600 by default; the whole test set). Same params and
raw files give byte-identical outputs."""

from __future__ import annotations

from typing import Any

from deepopt import paths
from deepopt.config import Params
from deepopt.data import SPLITS, prepare, write_prepared
from deepopt.files import check_writable

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    check_writable(*(paths.prepared_split_path(name) for name in SPLITS), paths.meta_path())
    prepared = prepare(params.data, params.seed)
    meta = prepared.data.meta
    written = write_prepared(prepared.blobs, meta)
    return {
        "stage": "prepare",
        "dataset": params.data.name,
        "source": meta["source"],
        "counts": meta["counts"],
        "mean": meta["mean"],
        "std": meta["std"],
        "outputs": [str(path) for path in written],
    }
