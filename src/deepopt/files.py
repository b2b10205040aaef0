"""Atomic file writes (every output appears whole or not at all) and the one guarded
``torch.load`` for every file deepopt reads back.

Each writer writes a temp file in the destination's folder and renames it over the target
(``os.replace`` is atomic within one filesystem), so DVC never caches a half-written file
and a killed stage leaves the previous version or nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from deepopt.errors import DataError, DeepoptError, one_line

__all__ = [
    "UnreadableFileError",
    "atomic_path",
    "check_writable",
    "load_torch",
    "write_bytes",
    "write_json",
    "write_text",
    "write_torch",
]


def check_writable(*targets: str | Path) -> None:
    """Refuse, before a stage does any work, outputs that could not be written: the target
    is a folder, or the nearest existing folder above it is a file or not writable.

    Checks only (nothing is created), so a stage that cannot finish fails at once instead
    of after training, and leaves no MLflow run or checkpoint behind.
    """
    for target in map(Path, targets):
        if target.is_dir():
            raise DeepoptError(f"cannot write {target}: it is a folder")
        # Path.exists() is False below a file ("models/small" when "models" is a file).
        existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
        if not existing.is_dir():
            raise DeepoptError(f"cannot write {target}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DeepoptError(f"cannot write {target}: folder {existing} is not writable")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
    except OSError as err:
        raise DeepoptError(f"cannot write {target}: {err.strerror or err}") from None
    os.close(handle)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs get the usual umask-based mode like any new file.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(target: str | Path, mode: str, write: Callable[[IO[Any]], object]) -> None:
    with atomic_path(target) as tmp, open(tmp, mode) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes(target: str | Path, data: bytes) -> None:
    _write(target, "wb", lambda handle: handle.write(data))


def write_text(target: str | Path, text: str) -> None:
    _write(target, "w", lambda handle: handle.write(text))


def write_json(target: str | Path, data: Any) -> None:
    """Pretty, key-sorted JSON (stable bytes for the same data) with a final newline."""
    write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_torch(target: str | Path, obj: Any) -> None:
    import torch  # lazy: this module is also used by torch-free commands

    _write(target, "wb", lambda handle: torch.save(obj, handle))


class UnreadableFileError(DataError):
    """A file torch cannot load safely; ``problem`` says why in one line."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: cannot be loaded ({problem})")
        self.path = path
        self.problem = problem


_UNSAFE = "it holds objects other than tensors and plain data; refused unread"


def load_torch(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU: a file is never unpickled with
    code execution, and a GPU-written file loads anywhere.

    FileNotFoundError passes through (the caller says what is missing and what makes it);
    any other failure is an ``UnreadableFileError`` with a one-line problem. torch's own text
    suggests ``weights_only=False``, exactly what must not happen, so it is replaced.
    """
    import warnings

    import torch  # lazy: this module is also used by torch-free commands

    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about an unusual pickle protocol before refusing it.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several types for a corrupt archive
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        problem = _UNSAFE if first.startswith("Weights only load failed") else one_line(first, 200)
        raise UnreadableFileError(path, problem) from None
