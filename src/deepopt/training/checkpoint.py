"""Per-epoch checkpoints, keyed by the resolved config and the data they were made from.

A checkpoint holds the ``LoopState`` (model, optimizer, schedule, early stopping, RNGs,
history), the MLflow run id to continue, and whether the run finished. Its file name is a
hash of the run config, the member's seed and the prepared data, so changed params or
data never resume a wrong checkpoint. Files load through ``files.load_torch``
(``weights_only=True`` on the CPU): plain containers and tensors only, nothing that can run
code, and a checkpoint written on a GPU resumes anywhere. A damaged checkpoint is set aside
(``resume_checkpoint``) and its member trains from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deepopt.config import RunConfig
from deepopt.devices import to_cpu
from deepopt.errors import DataError
from deepopt.files import UnreadableFileError, load_torch, write_torch

__all__ = [
    "DamagedCheckpointError",
    "check_payload",
    "check_weights",
    "checkpoint_file",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
]


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
    # Nor does the device: a checkpoint written on a GPU resumes on the CPU and back.
    resolved["train"].pop("device", None)
    resolved.pop("mlflow", None)
    key: dict[str, Any] = {"config": resolved, "seed": seed, "data": data_digest}
    if world_size > 1:
        key["world_size"] = world_size
    else:
        resolved["train"].pop("sync_batchnorm", None)  # means nothing in one process
    blob = json.dumps(key, sort_keys=True)
    return folder / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` with its tensors on the CPU: a checkpoint resumes on any device."""
    write_torch(path, to_cpu(payload))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, None when there is none; a file that is not a safe,
    readable checkpoint (``check_payload``) is a DamagedCheckpointError, a DataError (it is
    never unpickled with code execution)."""
    if not path.exists():
        return None
    try:
        payload = load_torch(path)
    except UnreadableFileError as err:
        raise DamagedCheckpointError(
            path,
            f"not a loadable checkpoint ({err.problem})",
            unsafe=err.unsafe,
        ) from None
    problem = check_payload(payload)
    if problem is not None:
        raise DamagedCheckpointError(path, f"not a deepopt checkpoint ({problem})")
    return dict(payload)


class DamagedCheckpointError(DataError):
    """A checkpoint file that cannot be continued; ``unsafe`` when it was refused unread
    because it holds objects other than tensors (it was not written by deepopt)."""

    def __init__(self, path: Path, problem: str, *, unsafe: bool = False) -> None:
        super().__init__(f"{path}: {problem}; delete it to start this run anew")
        self.path = path
        self.problem = problem
        self.unsafe = unsafe


def _tensors(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def check_payload(payload: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure (pure), None when it is one:
    ``{"loop": LoopState.to_dict(), "run_id": str | None, "finished": bool}``."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict"
    absent = [key for key in ("loop", "run_id", "finished") if key not in payload]
    if absent:
        return f"no {', '.join(repr(key) for key in absent)}"
    loop, run_id, finished = payload["loop"], payload["run_id"], payload["finished"]
    if not isinstance(finished, bool) or not (run_id is None or isinstance(run_id, str)):
        return "'finished' or 'run_id' has the wrong type"
    if not isinstance(loop, dict) or not _tensors(loop.get("model")):
        return "its 'loop' holds no model weights"
    done, history = loop.get("epochs_done"), loop.get("history")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        return f"'epochs_done' is {done!r}"
    if (
        not isinstance(history, list)
        or len(history) != done
        or not all(
            isinstance(r, dict) and all(isinstance(v, int | float) for v in r.values())
            for r in history
        )
    ):
        return f"its history does not hold {done} epoch records of numbers"
    for key in ("optimizer", "schedule", "early_stopping"):
        if not (loop.get(key) is None or isinstance(loop[key], dict)):
            return f"'{key}' is a {type(loop[key]).__name__}"
    if not finished and loop.get("optimizer") is None:
        return "an unfinished run without optimizer state"
    if loop.get("best_model") is not None and not _tensors(loop["best_model"]):
        return "'best_model' holds no weights"
    if not (loop.get("grad_scaler") is None or isinstance(loop["grad_scaler"], dict)):
        return "'grad_scaler' is not a dict"
    for key in ("shuffle_rng", "torch_rng", "cuda_rng"):
        rng = loop.get(key)
        if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            return f"'{key}' is not a uint8 tensor"
    return None


def check_weights(
    path: Path, payload: dict[str, Any], expected: Mapping[str, torch.Tensor]
) -> None:
    """DamagedCheckpointError unless the checkpoint's weights have the names, shapes and
    dtypes of ``expected`` (a freshly built network's state dict)."""
    loop = payload["loop"]
    for key in ("model", "best_model"):
        weights = loop.get(key)
        if weights is None:
            continue
        if set(weights) != set(expected):
            odd = sorted(set(weights) ^ set(expected))
            problem = f"its {key} weights do not fit the network ({odd[0]!r} and more)"
            raise DamagedCheckpointError(path, problem)
        for name, tensor in weights.items():
            want = expected[name]
            if tensor.shape != want.shape or tensor.dtype != want.dtype:
                problem = (
                    f"{key} weight {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                    f"the network's {want.dtype} {list(want.shape)}"
                )
                raise DamagedCheckpointError(path, problem)


def resume_checkpoint(
    path: Path, expected: Callable[[], Mapping[str, torch.Tensor]]
) -> dict[str, Any] | None:
    """``load_checkpoint``, and its weights checked against ``expected()`` (called only
    when there is a checkpoint); a damaged checkpoint is set aside as ``<name>.pt.corrupt``
    with a one-line warning and None is returned: the member trains from the start.

    Safe because a checkpoint only saves time: the same config, seed and data train the
    same network again, recorded in a new, complete MLflow run (the earlier run, if any,
    stays as it was). A file refused as unsafe (objects other than tensors: not written by
    deepopt) is not recovered: it stays an error, the file left for inspection.
    """
    try:
        saved = load_checkpoint(path)
        if saved is not None:
            check_weights(path, saved, expected())
    except DamagedCheckpointError as err:
        if err.unsafe:
            raise
        aside = _set_aside(path)
        print(
            f"deepopt: warning: {path}: {err.problem}; set aside as {aside.name}, "
            "this member trains from the start",
            file=sys.stderr,
            flush=True,
        )
        return None
    return saved


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.corrupt`` (``.corrupt.2``, ...)."""
    aside = path.with_name(f"{path.name}.corrupt")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt.{number}")
    try:
        os.replace(path, aside)
    except OSError as err:
        raise DataError(
            f"{path}: damaged, and cannot be set aside ({err.strerror or err}); delete it to "
            "start this run anew"
        ) from None
    return aside
