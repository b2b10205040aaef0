"""The Optuna storage: its URL, opening it, the claim locks, and trials left by dead processes.

Every storage URL (params.yaml's ``tune.storage``, ``--storage``) goes through
``parse_storage_url``, whose rules are ``config.check_storage_url``'s.
"""

from __future__ import annotations

import copy
import hashlib
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from deepopt.config import StorageUrl, TuneConfig, check_storage_url
from deepopt.errors import ConfigError, DeepoptError, one_line
from deepopt.files import FileLock, sqlite_file_tables
from deepopt.retry import retry

__all__ = [
    "MAX_RETRIES",
    "ClaimLock",
    "DatabaseClaimLock",
    "StorageUrl",
    "StudyStorage",
    "claim_lock",
    "fail_orphans",
    "fail_stale",
    "open_storage",
    "parse_storage_url",
    "requeue",
]

MAX_RETRIES = 3  # a trial whose process keeps dying is queued again at most this often
_SCHEMA_RACE_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # before each new try to open a new database


def parse_storage_url(url: str, key: str = "tune.storage") -> StorageUrl:
    """``config.check_storage_url`` as a ConfigError naming ``key`` (the setting or option
    the URL came from), for a URL that did not come through params.yaml's validation."""
    try:
        return check_storage_url(url, key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class StudyStorage:
    storage: BaseStorage
    heartbeat: bool  # RUNNING trials of dead processes are failed by Optuna
    shown: str  # the URL without password, for logs and tags


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRIES, inherit_intermediate_values=True
        )


def open_storage(
    url: str | StorageUrl, tune: TuneConfig, key: str = "tune.storage"
) -> StudyStorage:
    """Open (creating tables or file) the storage at ``url``: any SQLAlchemy URL, with a
    heartbeat, or ``journal:///FILE`` (relative, ``journal:////abs`` absolute)."""
    parsed = url if isinstance(url, StorageUrl) else parse_storage_url(url, key)
    if parsed.scheme == "journal":
        assert parsed.file is not None
        try:
            parsed.file.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(parsed.file))
            return StudyStorage(JournalStorage(backend), False, parsed.url)
        except OSError as err:
            raise DeepoptError(f"Optuna storage {parsed.url}: {err.strerror or err}") from None
    import sqlalchemy

    engine_kwargs: dict[str, Any] = {}
    if parsed.file is not None:  # sqlite
        try:
            parsed.file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            folder = f"cannot create the folder of its file ({err.strerror or err})"
            raise DeepoptError(f"Optuna storage {parsed.url}: {folder}") from None
        _check_storage_file(parsed.file, key)
        # Writers (workers, heartbeats) wait for the file lock instead of failing after 5 s.
        engine_kwargs["connect_args"] = {"timeout": 60}
    shown = sqlalchemy.engine.make_url(parsed.url).render_as_string(hide_password=True)

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                parsed.url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=tune.heartbeat_interval,
                grace_period=tune.heartbeat_grace,
                heartbeat_stale_trial_callback=_retry_callback(),
            )

    def schema_race(err: BaseException) -> bool:
        # Workers that start together on an empty database race to create Optuna's
        # tables ("duplicate key ... pg_type", "relation already exists"): the loser
        # opens the winner's tables a moment later.
        return isinstance(err, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError)

    try:
        storage = retry(connect, transient=schema_race, delays_s=_SCHEMA_RACE_DELAYS_S)
    except sqlalchemy.exc.DatabaseError as err:
        if parsed.file is not None:  # a damaged sqlite file
            problem = one_line(getattr(err, "orig", None) or err, 200)
            raise _unusable_storage(parsed.file, problem, key) from None
        raise DeepoptError(f"Optuna storage {shown} cannot be opened: {one_line(err)}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        raise DeepoptError(f"Optuna storage {shown} cannot be opened: {one_line(err)}") from None
    return StudyStorage(storage, True, shown)


# Optuna's own tables (its alembic_version aside, which MLflow's stores have too).
_OPTUNA_TABLES = frozenset(
    ("studies", "study_directions", "trials", "trial_params", "trial_values", "version_info")
)


def _unusable_storage(file: Path, problem: str, key: str) -> DeepoptError:
    return DeepoptError(
        f"{file} is not a usable Optuna storage ({problem}); move it aside and rerun, or set "
        f"{key} to another file"
    )


def _check_storage_file(file: Path, key: str) -> None:
    """Refuse a sqlite file that is not an Optuna storage before Optuna touches it: not a
    database, a damaged one, or a database of something else (Optuna would add its tables
    to it). A missing or empty file becomes a new storage (an empty one with a warning)."""
    try:
        found = sqlite_file_tables(file, timeout_s=60.0, what="Optuna storage")
    except sqlite3.Error as err:
        raise _unusable_storage(file, one_line(err, 200), key) from None
    if found is None:
        return
    tables, listed = found
    # While another worker creates the tables, some of Optuna's are there already.
    if tables and not tables & _OPTUNA_TABLES:
        problem = f"a sqlite database of something else: tables {listed}"
        raise _unusable_storage(file, problem, key)


def requeue(study: optuna.Study, number: int) -> None:
    """Queue trial ``number`` again (same params and reported values, at most MAX_RETRIES),
    as Optuna's heartbeat does on SQL storages for a trial whose process died."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    _retry_callback()(study, copy.deepcopy(frozen))


def fail_orphans(study: optuna.Study) -> list[int]:
    """Without a heartbeat: fail and requeue every RUNNING trial (call only while no worker
    of this study runs, i.e. when a session starts); their numbers."""
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        requeue(study, number)
    return orphans


def fail_stale(study: optuna.Study, storage: StudyStorage) -> None:
    """With a heartbeat: fail (and so requeue) the RUNNING trials whose heartbeat stopped."""
    if storage.heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


class ClaimLock(FileLock):
    """An exclusive lock file: one worker of this machine at a time counts the study's
    trials and creates the next one (waiting for the others). Released by the objective
    once its trial exists."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, wait=True)


class DatabaseClaimLock:
    """A PostgreSQL advisory lock on the study: one worker of any machine at a time counts
    the study's trials and creates the next one (a lock file orders one machine's only).
    Transaction-scoped, so it is released whatever happens to the connection."""

    def __init__(self, engine: Any, study_name: str) -> None:
        self._engine = engine
        digest = hashlib.sha256(f"deepopt-claim:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # a bigint lock id
        self._connection: Any = None

    def __enter__(self) -> DatabaseClaimLock:
        import sqlalchemy

        self._connection = self._engine.connect()
        self._connection.begin()
        self._connection.execute(
            sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._key}
        )
        return self

    def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.rollback()  # ends the transaction and with it the lock
            connection.close()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_lock(storage: StudyStorage, path: Path, study_name: str) -> ClaimLock | DatabaseClaimLock:
    """The lock under which a worker counts and claims: the database's own on PostgreSQL
    (workers on many machines), else the lock file ``path`` (this machine's workers)."""
    engine = getattr(storage.storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        return DatabaseClaimLock(engine, study_name)
    return ClaimLock(path)
