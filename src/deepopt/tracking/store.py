"""Which MLflow store deepopt records into (chosen, checked and prepared once per process), and
``_call``, the guard every MLflow request goes through: lock retries, one-line TrackingErrors.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from deepopt import interrupts, paths
from deepopt.errors import TrackingError, one_line
from deepopt.files import sqlite_file_tables
from deepopt.retry import retry

__all__ = ["PROBE_TIMEOUT_S", "artifact_location", "configure", "configured_uri"]

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 4.0  # connect + read of the server probe; well inside the 10 s budget
# A server that goes away mid-run: fail after ~1-2 min, not after MLflow's default 7 retries
# with exponential backoff and 120 s timeouts (minutes). Only defaults: the user's env wins.
_HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# Seconds to wait before each retry of a "database is locked" failure; each attempt itself
# already waited MLflow's 20 s sqlite busy timeout.
_LOCKED_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)

# MLflow's store schemes besides sqlite:/// and http(s) ("": a plain folder path, "+driver"
# dropped: postgresql+psycopg2).
_OTHER_STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "uc")

# The one place of the tracking package's state: the store configure() chose, and for
# sqlite stores the artifact folder beside it. The other modules read them from here.
_tracking_uri: str | None = None
_artifact_roots: dict[str, Path] = {}

# The store. MLFLOW_TRACKING_URI when set (a tracking server works unchanged), else
# sqlite:///<repo_root>/mlruns/mlflow.db with artifacts in <repo_root>/mlruns/artifacts.
# paths.repo_root is the workspace even inside `dvc exp run --temp` copies, so those runs
# land in the workspace's store too.
#
# Several processes may log into one sqlite file at once (`dvc exp run --queue` workers,
# Optuna). What we found with MLflow 3.17:
# * MLflow's sessions set PRAGMA busy_timeout = 20000, so concurrent writers wait for the
#   lock instead of failing: 5 writers x 300 log_batch calls + a reader lost nothing and
#   raised no "database is locked" at all.
# * The real hazard is a *new* file: two processes creating the schema at once crash in the
#   migrations ("duplicate column name"). _prepare_sqlite therefore creates the schema under
#   an flock on a file beside the database.
# * WAL journal mode (set once, it persists in the file) lets readers such as `mlflow ui`
#   and writers proceed together, and 4 concurrent writers finished in ~8.5 s instead of
#   ~10.5-13.5 s with the default rollback journal.
# * "database is locked" can still happen when a lock is held past the 20 s busy timeout
#   (a long `mlflow gc`, a stuck process); every logging call retries it with backoff.


def configure(root: Path | None = None) -> str:
    """Point MLflow at deepopt's store and return its URI (TrackingError if unusable).

    ``root`` is the repository root for the default store (default: ``paths.repo_root()``);
    it is ignored when ``MLFLOW_TRACKING_URI`` is set. A relative ``sqlite:///`` path in that
    variable is taken relative to the repository root, as ``make ui`` reads it.
    """
    global _tracking_uri
    root = (root or paths.repo_root()).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        for name, value in _HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        _probe_server(uri)
    elif uri.startswith("sqlite:///"):
        uri = _prepare_sqlite(uri, root)
    else:
        _check_scheme(uri)
    mlflow.set_tracking_uri(uri)
    _tracking_uri = uri
    return uri


def configured_uri() -> str | None:
    """The URI ``configure`` chose last, or None before the first call (for messages)."""
    return _tracking_uri


def artifact_location() -> str | None:
    """The ``file:`` URI of the artifact folder beside the configured sqlite store; None for
    other stores (a server picks its own)."""
    artifacts = _artifact_roots.get(_tracking_uri or "")
    return artifacts.as_uri() if artifacts else None


def _check_scheme(uri: str) -> None:
    """Refuse a URI no MLflow store serves (MLflow itself fails later with a traceback)."""
    scheme = urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme not in _OTHER_STORE_SCHEMES:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI {uri!r} has an unknown scheme '{scheme}'; use sqlite:///<file>, "
            "http(s)://<server>, file:<folder> or a database URL, or unset it for mlruns/mlflow.db"
        )


def _probe_server(uri: str) -> None:
    """Fail fast when nothing answers at ``uri``: MLflow itself would retry for minutes."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:  # something answers (a 401/404 is for MLflow itself to report)
            return
        problem = f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        problem = one_line(reason)
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({problem}); start it or unset "
        "MLFLOW_TRACKING_URI to use the local sqlite store"
    )


def _prepare_sqlite(uri: str, root: Path) -> str:
    """Create the folders and the schema of a sqlite store once; return the absolute URI."""
    db_file = Path(uri.removeprefix("sqlite:///"))
    if not db_file.is_absolute():
        db_file = root / db_file
    artifacts = db_file.parent / "artifacts"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(
            f"MLflow store {uri}: cannot create folder {artifacts}: {err.strerror or err}; "
            "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a server"
        ) from None
    uri = f"sqlite:///{db_file}"
    if uri not in _artifact_roots:
        # Two processes creating the schema of a new file at once break its migrations,
        # so the first use of the store in each process is serialized across processes.
        with open(db_file.parent / f".{db_file.name}.init-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _check_store_file(db_file)
            try:
                _call(
                    f"open store {uri}",
                    lambda: MlflowClient(uri).search_experiments(max_results=1),
                )
            except TrackingError as err:
                cause = err.__cause__
                if isinstance(cause, sqlalchemy.exc.DatabaseError):
                    raise _unusable_store(db_file, _db_problem(cause)) from None
                raise
            _enable_wal(db_file)
        _artifact_roots[uri] = artifacts
    return uri


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (as the user names it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _unusable_store(db_file: Path, problem: str) -> TrackingError:
    return TrackingError(
        f"{_shown(db_file)} is not a usable MLflow store ({problem}); move it aside and rerun, "
        "or point MLFLOW_TRACKING_URI elsewhere"
    )


def _db_problem(err: BaseException) -> str:
    """SQLite's own words for a damaged database (without SQLAlchemy's SQL and links)."""
    return one_line(getattr(err, "orig", None) or err, 200)


def _check_store_file(db_file: Path) -> None:
    """Refuse a file that is not an MLflow sqlite store before MLflow touches it: not a
    database, a damaged one, or a database of something else (MLflow would add its tables
    to it). A missing or empty file becomes a new store (an empty one with a warning)."""
    try:
        found = sqlite_file_tables(
            db_file, timeout_s=20.0, what="MLflow store", shown=_shown(db_file)
        )
    except sqlite3.Error as err:
        raise _unusable_store(db_file, one_line(err, 200)) from None
    if found is None:
        return
    tables, listed = found
    if tables and not {"experiments", "runs"} <= tables:
        raise _unusable_store(db_file, f"a sqlite database of something else: tables {listed}")


def _enable_wal(db_file: Path) -> None:
    """WAL lets readers (mlflow ui) and writers work at once; the mode persists in the file."""
    try:
        with contextlib.closing(sqlite3.connect(db_file, timeout=20.0)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:  # an optimization only: the default journal still works
        _log.warning("could not switch %s to WAL journal mode: %s", db_file, err)


def _client() -> MlflowClient:
    """A client of the configured store (configuring it on first use)."""
    return MlflowClient(_tracking_uri or configure())


def _is_locked(error: BaseException) -> bool:
    """An MLflow or OS error saying sqlite held a lock past its busy timeout: worth a retry."""
    text = str(error)
    return isinstance(error, (MlflowException, OSError)) and (
        "database is locked" in text or "database table is locked" in text
    )


def _call(what: str, action: Callable[[], _T]) -> _T:
    """Run one MLflow call; retry "database is locked"; any other MLflow or OS error is a
    TrackingError naming ``what`` and the store."""

    def attempt() -> _T:
        with interrupts.deferred():  # Ctrl-C mid-write would leave the store locked
            return action()

    try:
        # Jitter (the default): writers that collided retry apart.
        return retry(attempt, transient=_is_locked, delays_s=_LOCKED_RETRY_DELAYS_S)
    except (MlflowException, OSError) as err:
        raise TrackingError(f"MLflow {what} failed ({_tracking_uri}): {one_line(err)}") from err
    except sqlalchemy.exc.SQLAlchemyError as err:  # MLflow passes some database errors on
        problem = _db_problem(err)
        raise TrackingError(f"MLflow {what} failed ({_tracking_uri}): {problem}") from err
