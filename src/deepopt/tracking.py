"""The one thin MLflow module: where runs, metrics, artifacts and models are recorded.

The training loop never imports mlflow; the stage ``main``s call the functions here with
explicit run ids (no fluent "active run"), so a process can keep several runs open.

Store. ``MLFLOW_TRACKING_URI`` when set (a tracking server works unchanged), else
``sqlite:///<repo_root>/mlruns/mlflow.db`` with artifacts in ``<repo_root>/mlruns/artifacts``.
``paths.repo_root`` is the workspace even inside ``dvc exp run --temp`` copies, so those
runs land in the workspace's store too.

Several processes may log into one sqlite file at once (``dvc exp run --queue`` workers,
Optuna). What we found with MLflow 3.17:

* MLflow's sessions set ``PRAGMA busy_timeout = 20000``, so concurrent writers wait for the
  lock instead of failing: 5 writers x 300 ``log_batch`` calls + a reader lost nothing and
  raised no "database is locked" at all.
* The real hazard is a *new* file: two processes creating the schema at once crash in the
  migrations ("duplicate column name"). ``configure`` therefore creates the schema under an
  ``flock`` on a file beside the database.
* WAL journal mode (set once, it persists in the file) lets readers such as ``mlflow ui``
  and writers proceed together, and 4 concurrent writers finished in ~8.5 s instead of
  ~10.5-13.5 s with the default rollback journal.
* "database is locked" can still happen when a lock is held past the 20 s busy timeout
  (a long ``mlflow gc``, a stuck process); every logging call retries it with backoff.

Models. ``log_model`` creates an MLflow 3 LoggedModel in the run's experiment and links it
to the run as an output: ``mlflow ui`` lists it in the run's "Logged models" section and in
the experiment's "Models" tab (not in the run's Artifacts tab), and it loads with
``mlflow.pytorch.load_model("models:/<model_id>")`` (``runs:/<run_id>/model`` no longer
resolves). The run also gets a ``model_uri`` tag pointing at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

import deepopt
from deepopt import interrupts, paths
from deepopt.errors import TrackingError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

__all__ = [
    "PROBE_TIMEOUT_S",
    "EndStatus",
    "configure",
    "end_run",
    "ending_run",
    "ensure_experiment",
    "find_runs",
    "flatten_params",
    "log_artifact",
    "log_dataset",
    "log_dict",
    "log_epoch",
    "log_figure",
    "log_metrics",
    "log_model",
    "log_params",
    "logged_epochs",
    "run_exists",
    "run_status",
    "run_tags",
    "set_tags",
    "start_run",
    "tracked_run",
]

EndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_T = TypeVar("_T")
_log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 4.0  # connect + read of the server probe; well inside the 10 s budget
# A server that goes away mid-run: fail after ~1-2 min, not after MLflow's default 7 retries
# with exponential backoff and 120 s timeouts (minutes). Only defaults: the user's env wins.
_HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# Seconds to wait before each retry of a "database is locked" failure; each attempt itself
# already waited MLflow's 20 s sqlite busy timeout.
_LOCKED_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)
_REASON_MAX_CHARS = 1000  # MLflow tag values may hold 8000; a reason is one line
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

# MLflow's store schemes besides sqlite:/// and http(s) ("": a plain folder path, "+driver"
# dropped: postgresql+psycopg2).
_OTHER_STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "uc")
# The store configure() chose, and for sqlite stores the artifact folder beside it.
_tracking_uri: str | None = None
_artifact_roots: dict[str, Path] = {}


# ---------------------------------------------------------------------------------------
# The store


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
        problem = _one_line(reason)
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
            _call(f"open store {uri}", lambda: MlflowClient(uri).search_experiments(max_results=1))
            _enable_wal(db_file)
        _artifact_roots[uri] = artifacts
    return uri


def _enable_wal(db_file: Path) -> None:
    """WAL lets readers (mlflow ui) and writers work at once; the mode persists in the file."""
    try:
        with contextlib.closing(sqlite3.connect(db_file, timeout=20.0)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:  # an optimization only: the default journal still works
        _log.warning("could not switch %s to WAL journal mode: %s", db_file, err)


def _client() -> MlflowClient:
    return MlflowClient(_tracking_uri or configure())


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


def _call(what: str, action: Callable[[], _T]) -> _T:
    """Run one MLflow call; retry "database is locked"; anything else is a TrackingError."""
    for delay in (*_LOCKED_RETRY_DELAYS_S, None):
        try:
            with interrupts.deferred():  # Ctrl-C mid-write would leave the store locked
                return action()
        except (MlflowException, OSError) as err:
            if delay is not None and _is_locked(err):
                time.sleep(delay * (1.0 + random.random()))  # jitter: writers retry apart
                continue
            raise TrackingError(
                f"MLflow {what} failed ({_tracking_uri}): {_one_line(err)}"
            ) from err
    raise AssertionError("unreachable: the last attempt returns or raises")


# ---------------------------------------------------------------------------------------
# Experiments and runs


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created on first use (safe when processes race)."""
    client = _client()
    found = _call(f"get experiment '{name}'", lambda: client.get_experiment_by_name(name))
    if found is None:
        artifacts = _artifact_roots.get(_tracking_uri or "")
        location = artifacts.as_uri() if artifacts else None  # a server picks its own
        try:
            return _call(
                f"create experiment '{name}'",
                lambda: client.create_experiment(name, artifact_location=location),
            )
        except TrackingError:
            # Another process created it between our look-up and create: use theirs.
            found = _call(f"get experiment '{name}'", lambda: client.get_experiment_by_name(name))
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' (id {found.experiment_id}) is deleted in "
            f"{_tracking_uri}; restore it (mlflow experiments restore --experiment-id "
            f"{found.experiment_id}) or set mlflow.experiment to another name"
        )
    return str(found.experiment_id)


def run_exists(run_id: str) -> bool:
    """Whether ``run_id`` is a live (not deleted) run of this store, e.g. from a checkpoint."""
    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        # A store that cannot answer must not make the caller start a duplicate run.
        raise TrackingError(
            f"MLflow get run {run_id} failed ({_tracking_uri}): {_one_line(err)}"
        ) from err
    return bool(run.info.lifecycle_stage == "active")


def run_status(run_id: str) -> str:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    return str(_call(f"get run {run_id}", lambda: _client().get_run(run_id)).info.status)


def start_run(
    experiment_id: str,
    run_name: str,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a run, or with ``run_id`` continue that run (set RUNNING again); its id.

    ``parent_run_id`` nests the run under another (the tune study's run) in ``mlflow ui``.
    """
    client = _client()
    all_tags = {**(tags or {})}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id is None:
        run = _call(
            f"create run '{run_name}'",
            lambda: client.create_run(experiment_id, tags=all_tags, run_name=run_name),
        )
        return str(run.info.run_id)
    if not run_exists(run_id):
        raise TrackingError(
            f"MLflow run {run_id} to resume is not in {_tracking_uri} (deleted, or another "
            "store); check run_exists() first and start a new run instead"
        )
    _call(f"resume run {run_id}", lambda: client.update_run(run_id, status="RUNNING"))
    set_tags(run_id, {**all_tags, "resumed": "true"})
    return run_id


def end_run(run_id: str, status: EndStatus, reason: str | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED; ``reason`` is kept as tag ``end_reason``."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, but got {status=}")
    if reason:
        set_tags(run_id, {"end_reason": _one_line(reason)[:_REASON_MAX_CHARS]})
    _call(f"end run {run_id}", lambda: _client().set_terminated(run_id, status=status))


@contextlib.contextmanager
def ending_run(run_id: str) -> Iterator[str]:
    """End the run when the block ends, unless code inside already ended it.

    FINISHED on normal exit, KILLED on KeyboardInterrupt (Ctrl-C/SIGTERM), FAILED on any
    other exception (its one-line message is the end reason). A run ended inside the block
    keeps its status: tune ends a pruned trial's run KILLED before raising TrialPruned.
    """
    try:
        yield run_id
    except KeyboardInterrupt:
        _end_if_running(run_id, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except SystemExit as err:
        if err.code in (0, None):
            _end_if_running(run_id, "FINISHED", None)
        else:
            _end_if_running(run_id, "FAILED", f"exit status {err.code}")
        raise
    except BaseException as err:
        _end_if_running(run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    _end_if_running(run_id, "FINISHED", None)


def _end_if_running(run_id: str, status: EndStatus, reason: str | None) -> None:
    try:
        if run_status(run_id) == "RUNNING":
            end_run(run_id, status, reason)
    except TrackingError as err:
        if status == "FINISHED":
            raise
        # Never hide the exception that is ending the run behind a tracking failure.
        _log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


@contextlib.contextmanager
def tracked_run(
    experiment_id: str,
    run_name: str,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """``start_run`` + ``ending_run``: yields the run id, ends it however the block ends."""
    started = start_run(
        experiment_id, run_name, run_id=run_id, parent_run_id=parent_run_id, tags=tags
    )
    with ending_run(started):
        yield started


def find_runs(
    experiment_id: str, *, tags: Mapping[str, str] | None = None, status: str | None = None
) -> list[str]:
    """Ids of the experiment's runs whose tags (and status) match, newest first."""
    clauses = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
    if status is not None:
        clauses.append(f"attributes.status = {_quote(status)}")
    filter_string = " and ".join(clauses)
    client = _client()
    ids: list[str] = []
    token: str | None = None
    while True:
        page = _call(
            f"search runs of experiment {experiment_id}",
            functools.partial(
                client.search_runs,
                [experiment_id],
                filter_string,
                max_results=1000,
                page_token=token,
            ),
        )
        ids.extend(str(run.info.run_id) for run in page)
        token = page.token
        if not token:
            return ids


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_tags(
    *,
    dataset: str,
    meta: Mapping[str, Any] | None = None,
    seed: int | None = None,
    cwd: Path | None = None,
) -> dict[str, str]:
    """What makes a run reproducible: code version, data identity, seed, library versions.

    The git commit is also set as ``mlflow.source.git.commit``, which ``mlflow ui`` shows.
    ``meta`` is the prepared data's meta.json; its ``digest`` (else a hash of it) is
    ``data_digest``. Git runs in ``cwd`` (default: the current folder), which inside a
    ``dvc exp run --temp`` copy is that copy, with the experiment's changes.
    """
    import torch

    commit, dirty = _git_state(cwd or Path.cwd())
    tags = {
        "git_commit": commit,
        "git_dirty": dirty,
        "dataset": dataset,
        "torch_version": torch.__version__,
        "deepopt_version": deepopt.__version__,
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if meta is not None:
        digest = meta.get("digest")
        if not isinstance(digest, str):
            blob = json.dumps(meta, sort_keys=True, default=str).encode()
            digest = hashlib.sha256(blob).hexdigest()
        tags["data_digest"] = digest
    if seed is not None:
        tags["seed"] = str(seed)
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags


def _git_state(cwd: Path) -> tuple[str, str]:
    """(commit, "true"/"false" for uncommitted changes to tracked files); "unknown" if no git."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if dirty else "false"


# ---------------------------------------------------------------------------------------
# Params, metrics, tags


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.02}}`` -> ``{"optim.lr": "0.02"}``; values as in params.yaml
    (JSON: true, null, [10, 40, 80]), strings unquoted."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(_plain(value))
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log (nested) params under dotted names. Re-logging equal values, as a resumed run
    does, is a no-op; a different value for a logged name is a TrackingError (MLflow
    params are immutable: changed settings need a new run)."""
    flat = flatten_params(params)
    client = _client()
    logged = _call(f"get run {run_id}", lambda: client.get_run(run_id)).data.params
    for key, value in flat.items():
        if key in logged and logged[key] != value:
            raise TrackingError(
                f"MLflow run {run_id}: param '{key}' was logged as {logged[key]!r}, now "
                f"{value!r}; a changed config needs a new run (delete its checkpoint)"
            )
    new = [Param(key, value) for key, value in flat.items() if key not in logged]
    for start in range(0, len(new), _PARAMS_PER_BATCH):
        _call(
            f"log params of run {run_id}",
            functools.partial(
                client.log_batch, run_id, params=new[start : start + _PARAMS_PER_BATCH]
            ),
        )


def log_epoch(run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """All of one epoch's metrics in one call, at ``step=epoch``."""
    log_metrics(run_id, metrics, step=epoch)


def log_metrics(run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    """Metrics at one step (e.g. test metrics of a finished run at step 0)."""
    now_ms = int(time.time() * 1000)
    batch = [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
    client = _client()
    for start in range(0, len(batch), _METRICS_PER_BATCH):
        _call(
            f"log metrics of run {run_id}",
            functools.partial(
                client.log_batch, run_id, metrics=batch[start : start + _METRICS_PER_BATCH]
            ),
        )


def logged_epochs(run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was logged: a resumed run re-logs the epochs a kill lost."""
    history = _call(
        f"read metric '{key}' of run {run_id}", lambda: _client().get_metric_history(run_id, key)
    )
    return {int(metric.step) for metric in history}


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) string tags in one call."""
    batch = [RunTag(key, str(value)) for key, value in tags.items()]
    if batch:
        _call(f"set tags of run {run_id}", lambda: _client().log_batch(run_id, tags=batch))


# ---------------------------------------------------------------------------------------
# Artifacts, datasets, models


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file or folder into the run's artifacts (under ``artifact_path``)."""
    if not Path(path).exists():
        raise TrackingError(f"artifact {path} does not exist; nothing logged to run {run_id}")
    _call(
        f"log artifact {path} to run {run_id}",
        lambda: _client().log_artifact(run_id, str(path), artifact_path),
    )


def log_figure(run_id: str, figure: Figure, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact, e.g. ``"history.png"`` (format from the
    extension). Already-written PNG files go through ``log_artifact``."""
    _call(
        f"log figure {artifact_file} to run {run_id}",
        lambda: _client().log_figure(run_id, figure, artifact_file),
    )


def log_dict(run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
    """A JSON/YAML artifact (by extension), e.g. the resolved config as ``config.json``."""
    _call(
        f"log {artifact_file} to run {run_id}",
        lambda: _client().log_dict(run_id, dict(data), artifact_file),
    )


def log_dataset(
    run_id: str,
    name: str,
    features: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    source: str | Path,
    digest: str | None = None,
    context: str = "training",
) -> None:
    """Record a prepared split as the run's input dataset (the "Datasets used" of the run).

    ``digest`` ties it to the prepared files (e.g. meta.json's ``digest``); without it
    MLflow hashes the arrays. Give each split its own ``name``: MLflow keeps one input per
    (name, digest) and run. Logging the same dataset again (a resumed run) adds nothing.
    """
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        # MLflow registers its local-file source for both "" and "file:" and then warns
        # that a path matches two (identical) sources.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = from_numpy(
            features,
            source=str(source),
            targets=targets,  # type: ignore[arg-type]  # MLflow's annotation omits its None default
            name=name,
            digest=digest,
        )
    entry = DatasetInput(
        dataset=Dataset(**dataset.to_dict()),
        tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
    )
    _call(
        f"log dataset '{name}' to run {run_id}",
        lambda: _client().log_inputs(run_id, datasets=[entry]),
    )


def _pip_requirements() -> list[str]:
    """Explicit pins, so MLflow does not infer them by loading the model in a subprocess
    (6.4 s against 1.2 s measured). The public version: ``torch.__version__`` carries a
    local build tag (+cu130) no index serves. MLflow adds its own pin."""
    return [f"torch=={importlib.metadata.version('torch')}"]


def log_model(
    run_id: str,
    model: nn.Module,
    input_example: np.ndarray,
    *,
    epoch: int | None = None,
    name: str = "model",
    serialization_format: Literal["pt2", "pickle"] = "pt2",
) -> str:
    """Log ``model`` as an MLflow 3 LoggedModel of the run; return its ``models:/`` URI.

    With a signature inferred from ``input_example`` and the model's output on it, the
    example itself, and explicit pip pins (no requirement inference). Saved as ``pt2`` by
    default (``torch.export``: loads without deepopt's code and without unpickling; the
    first call in a process pays ~2 s importing torch.export, later ones ~0.3 s) or as
    ``pickle`` (~0.8 s, then ~0.1 s; loading needs deepopt's classes importable, and
    MLflow warns that unpickling runs code). The metrics at step ``epoch`` (default: the
    last logged step) are linked to the model in the UI's Models tab. The model runs in
    eval mode and is left in the mode it came in.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    client = _client()
    run = _call(f"get run {run_id}", lambda: client.get_run(run_id))
    step = epoch if epoch is not None else _last_step(run_id, list(run.data.metrics))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
        # Created here rather than by log_model, which would file it under the fluent
        # "current" experiment (Default, artifacts in the working folder), not the run's.
        logged = _call(
            f"create logged model for run {run_id}",
            lambda: client.create_logged_model(
                experiment_id=run.info.experiment_id,
                name=name,
                source_run_id=run_id,
                params=dict(run.data.params),
                model_type="pytorch",
            ),
        )
        info = _call(
            f"log model of run {run_id}",
            lambda: mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=run_id,
                step=step,
                signature=signature,
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                serialization_format=serialization_format,
            ),
        )
    finally:
        model.train(was_training)
    model_uri = str(info.model_uri)
    set_tags(run_id, {"model_uri": model_uri})
    return model_uri


def _last_step(run_id: str, keys: list[str]) -> int:
    client = _client()
    steps = [0]
    for key in keys:
        history = _call(
            f"read metric '{key}' of run {run_id}",
            functools.partial(client.get_metric_history, run_id, key),
        )
        steps.extend(metric.step for metric in history)
    return max(steps)
