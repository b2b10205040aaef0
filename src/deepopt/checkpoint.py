"""Per-epoch checkpoints, keyed by the resolved config and the data they were made from.

A checkpoint holds the ``LoopState`` (model, optimizer, schedule, early stopping, RNGs,
history), the MLflow run id to continue, and whether the run finished. Its file name is a
hash of the run config, the member's seed and the prepared data, so changed params or
data never resume a wrong checkpoint. Files load with ``torch.load(weights_only=True)``:
plain containers and tensors only, nothing that can run code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from deepopt.config import RunConfig
from deepopt.errors import DataError
from deepopt.files import write_torch

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
        with warnings.catch_warnings():
            # torch warns about an unusual pickle protocol before refusing it: our one line
            # says it all.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if first_line.startswith("Weights only load failed"):
            # torch's text goes on to suggest weights_only=False: exactly what must not happen.
            first_line = "it holds objects other than tensors and plain data; refused unread"
        raise DataError(
            f"{path}: not a loadable checkpoint ({first_line}); delete it to start this run anew"
        ) from None
    if not isinstance(payload, dict) or "loop" not in payload:
        raise DataError(f"{path}: not a deepopt checkpoint; delete it to start this run anew")
    return payload
