"""Atomic file writes (every output appears whole or not at all), the lock files of
processes that share a workspace, and the one guarded ``torch.load`` for every file
deepopt reads back.

Each writer writes a temp file in the destination's folder and renames it over the target
(``os.replace`` is atomic within one filesystem), so DVC never caches a half-written file
and a killed stage leaves the previous version or nothing. Before anything is created, the
target must pass ``paths.check_output`` (it stays inside the workspace or a configured
folder). A failed write (a full disk, a quota) removes its temp file and is one line
naming the file: the previous version stays.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from deepopt.errors import DataError, DeepoptError, one_line
from deepopt.paths import check_output

__all__ = [
    "FileLock",
    "LockedError",
    "UnreadableFileError",
    "WriteError",
    "atomic_path",
    "check_writable",
    "exclusive",
    "load_torch",
    "read_json",
    "sqlite_file_tables",
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
        check_output(target)
        if target.is_dir():
            raise DeepoptError(f"cannot write {target}: it is a folder")
        # Path.exists() is False below a file ("models/small" when "models" is a file).
        existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
        if not existing.is_dir():
            raise DeepoptError(f"cannot write {target}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DeepoptError(f"cannot write {target}: folder {existing} is not writable")


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class WriteError(DeepoptError, OSError):
    """An output that could not be written (exit 1); the previous version, if any, is kept.
    Also an OSError (``errno``, ``strerror``), for callers that word it themselves."""

    def __init__(self, target: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.target = target
        full = _FULL.get(cause.errno or 0)
        if full is not None:
            kept = "its previous version is unchanged" if target.exists() else "it was not created"
            self.message = (
                f"cannot write {target}: {full} ({kept}); free some space and run this again"
            )
        else:
            self.message = f"cannot write {target}: {one_line(cause.strerror or cause)}"

    def __str__(self) -> str:
        return self.message


def _os_error(err: BaseException) -> OSError | None:
    """The file system's error behind ``err``: itself, or the OSError a RuntimeError was
    raised while handling (torch.save reports a failed write() of its file that way)."""
    if isinstance(err, DeepoptError):
        return None
    if isinstance(err, OSError):
        return err
    if isinstance(err, RuntimeError) and isinstance(err.__context__, OSError):
        return err.__context__
    return None


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success it is renamed onto ``target``.

    Any failure removes the temp file; one of the file system (raised while writing the
    temp file or renaming it) becomes a ``WriteError`` naming ``target``."""
    target = Path(target)
    check_output(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
    except OSError as err:
        raise WriteError(target, err) from None
    os.close(handle)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs get the usual umask-based mode like any new file.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:
            raise WriteError(target, cause) from None
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


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def read_json(path: Path, rerun: str, writer: str = "") -> dict[str, Any]:
    """The JSON object a stage wrote at ``path``; a one-line DataError saying what is wrong
    and ``rerun`` (what to run) when it is missing, empty, unreadable or not an object.
    ``writer`` (" (the train stage writes it)") follows the missing and empty messages."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            raise DataError(f"{path}: the file is empty; {rerun}{writer}")
        data = json.loads(text)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {rerun}{writer}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({one_line(err)}); {rerun}") from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise DataError(f"{path}: expected a JSON object, got {kind}; {rerun}")
    return data


def write_torch(target: str | Path, obj: Any) -> None:
    import torch  # lazy: this module is also used by torch-free commands

    _write(target, "wb", lambda handle: torch.save(obj, handle))


class LockedError(DeepoptError):
    """A lock another process holds (exit 1); ``held_by``: its pid and what it does."""

    def __init__(self, message: str, held_by: str) -> None:
        super().__init__(message)
        self.held_by = held_by


_HELD: dict[Path, FileLock] = {}  # the exclusive() locks this process holds, by real path


class FileLock:
    """An exclusive ``flock`` on a file beside what it guards; the kernel releases it when
    its process ends however it ends (also ``kill -9``), so a left-over file never blocks.

    ``wait=True`` waits for the holder (tune's claim lock); ``wait=False`` refuses at once
    with a LockedError quoting the holder's pid and ``holder``, which the lock file holds
    while it is held."""

    def __init__(self, path: Path, *, wait: bool = True, holder: str = "") -> None:
        self._path = Path(path)
        self._wait = wait
        self._holder = holder
        self._handle: IO[str] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self) -> FileLock:
        check_output(self._path)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self._path, "a+", encoding="utf-8")  # closed in release()
        except OSError as err:
            raise WriteError(self._path, err) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if self._wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            held_by = handle.read().strip() or "pid unknown"
            handle.close()
            raise LockedError(f"{self._path} is held by {held_by}", held_by) from None
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        if self._holder:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()}: {self._holder}\n")
            handle.flush()
        return self

    def release(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            if self._holder:
                handle.truncate(0)  # the next reader sees no stale holder
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextmanager
def exclusive(path: str | Path, holder: str, busy: str) -> Iterator[None]:
    """Hold the lock file ``path`` for this process, or refuse at once when another
    process holds it: LockedError "``busy``: another deepopt process (pid N: <its holder>)
    ...". Re-entrant within one process (a stage may hold what ``train_tracked`` takes
    again), so a process never waits for itself."""
    path = Path(path)
    key = check_output(path)
    if key in _HELD:
        yield
        return
    lock = FileLock(path, wait=False, holder=holder)
    try:
        lock.__enter__()
    except LockedError as err:
        raise LockedError(
            f"{busy}: another deepopt process ({err.held_by}) is using it; wait for it to "
            "finish or stop it, then run this again",
            err.held_by,
        ) from None
    _HELD[key] = lock
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


class UnreadableFileError(DataError):
    """A file torch cannot load safely; ``problem`` says why in one line."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: cannot be loaded ({problem})")
        self.path = path
        self.problem = problem
        self.unsafe = problem == _UNSAFE  # refused unread: not a file deepopt wrote


_UNSAFE = "it holds objects other than tensors and plain data; refused unread"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive; b"\x80" starts a (legacy) pickle


def _damage(path: Path) -> str | None:
    """What is plainly wrong with the bytes of a file torch.save would have written:
    nothing in it, neither its zip archive nor a pickle, or a zip archive without its end
    record (cut short); torch's own text for these misleads."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            # The end record (22 bytes and a comment of up to 64 KiB) closes every archive.
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - (1 << 16) - 22))
            tail = handle.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if not head:
        return "the file is empty"
    if head != _ZIP_MAGIC and head[:1] != b"\x80":
        return f"not a file torch.save writes: it starts with 0x{head.hex()}, not a zip archive"
    if head != _ZIP_MAGIC:
        return None  # a pickle: torch refuses it, or loads plain data
    if b"PK\x05\x06" not in tail:
        return "truncated: its zip archive has no end record"
    # torch does not check the archive's CRCs: changed bytes inside would load silently.
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"damaged zip archive: {one_line(err, 120)}"
    if bad is not None:
        return f"damaged: {bad} in its zip archive fails its CRC check"
    return None


def load_torch(path: str | Path, *, mmap: bool = False, map_location: str = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU: a file is never unpickled with
    code execution, and a GPU-written file loads anywhere (``map_location``, default the
    CPU: the caller moves what it needs to its device).

    FileNotFoundError passes through (the caller says what is missing and what makes it);
    any other failure is an ``UnreadableFileError`` with a one-line problem. torch's own text
    suggests ``weights_only=False``, exactly what must not happen, so it is replaced.
    """
    import warnings

    import torch  # lazy: this module is also used by torch-free commands

    path = Path(path)
    try:
        damage = _damage(path)
        if damage is not None:
            raise UnreadableFileError(path, damage)
        with warnings.catch_warnings():
            # torch warns about an unusual pickle protocol before refusing it.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (FileNotFoundError, UnreadableFileError):
        raise
    except Exception as err:  # torch raises several types for a corrupt archive
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if first.startswith("Weights only load failed"):
            raise UnreadableFileError(path, _UNSAFE) from None
        problem = f"damaged or truncated: {one_line(first.split('. ')[0], 160)}"
        raise UnreadableFileError(path, problem) from None


def sqlite_file_tables(
    file: Path, *, timeout_s: float, what: str, shown: str | None = None
) -> tuple[set[str], str] | None:
    """The tables of an existing sqlite store ``file`` and a short listing of them, read
    before MLflow or Optuna touch it (either would add its tables to any database); None
    for no file or an empty one (sqlite makes a new database of it: warned about, as
    ``what``, the file named as ``shown``). A damaged file or one that is no database:
    ``sqlite3.Error``."""
    import contextlib
    import sqlite3
    import sys

    if not file.exists():
        return None
    if file.stat().st_size == 0:
        name = shown or str(file)
        print(f"deepopt: warning: {name} is empty: a new {what} is created in it", file=sys.stderr)
        return None
    with contextlib.closing(sqlite3.connect(file, timeout=timeout_s)) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in rows}
    listed = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
    return tables, listed
