"""Per-epoch checkpoints, keyed by the resolved config and the data they were made from.

A checkpoint holds the ``LoopState`` (model, optimizer, schedule, early stopping, RNGs,
history), the MLflow run id to continue, and whether the run finished. Its file name is a
hash of the run config, the member's seed and the prepared data, so changed params or
data never resume a wrong checkpoint. Files load through ``files.load_torch``
(``weights_only=True`` on the CPU): plain containers and tensors only, nothing that can run
code, and a checkpoint written on a GPU resumes anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from deepopt.config import RunConfig
from deepopt.errors import DataError
from deepopt.files import UnreadableFileError, load_torch, write_torch

__all__ = ["checkpoint_file", "load_checkpoint", "save_checkpoint"]


def checkpoint_file(
    folder: Path, config: RunConfig, seed: int, data_digest: str, world_size: int = 1
) -> Path:
    """The checkpoint path of one member: <folder>/<hash of config, seed, data>.pt.

    ``world_size`` is the number of torchrun processes: their global batch is that many
    times train.batch_size, so each process count has its own checkpoints.
    """
    resolved = config.model_dump(mode="json")
    # Where checkpoints live and what MLflow experiment a run goes to don't change training.
    resolved["train"].pop("checkpoint_dir", None)
    resolved.pop("mlflow", None)
    key: dict[str, Any] = {"config": resolved, "seed": seed, "data": data_digest}
    if world_size > 1:
        key["world_size"] = world_size
    else:
        resolved["train"].pop("sync_batchnorm", None)  # means nothing in one process
    blob = json.dumps(key, sort_keys=True)
    return folder / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    write_torch(path, payload)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, None when there is none; a file that is not a safe,
    readable checkpoint is a DataError (it is never unpickled with code execution)."""
    if not path.exists():
        return None
    try:
        payload = load_torch(path)
    except UnreadableFileError as err:
        raise DataError(
            f"{path}: not a loadable checkpoint ({err.problem}); delete it to start this run anew"
        ) from None
    if not isinstance(payload, dict) or "loop" not in payload:
        raise DataError(f"{path}: not a deepopt checkpoint; delete it to start this run anew")
    return payload
