"""MLflow experiments and runs by explicit id (no fluent "active run"): create or resume a run,
end it however its block ends, look runs up by tag."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping
from typing import Literal

from mlflow.exceptions import MlflowException

from deepopt.errors import TrackingError, one_line
from deepopt.tracking.log import set_tags
from deepopt.tracking.store import _call, _client, artifact_location, configured_uri

__all__ = [
    "ROLE_TAG",
    "EndStatus",
    "end_run",
    "ending_run",
    "ensure_experiment",
    "experiment_run",
    "find_runs",
    "keyed_run",
    "run_exists",
    "run_status",
    "start_run",
    "tracked_run",
]

EndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_log = logging.getLogger(__name__)

_REASON_MAX_CHARS = 1000  # MLflow tag values may hold 8000; a reason is one line


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created on first use (safe when processes race)."""
    client = _client()
    found = _call(f"get experiment '{name}'", lambda: client.get_experiment_by_name(name))
    if found is None:
        location = artifact_location()
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
            f"{configured_uri()}; restore it (mlflow experiments restore --experiment-id "
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
            f"MLflow get run {run_id} failed ({configured_uri()}): {one_line(err)}"
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
            f"MLflow run {run_id} to resume is not in {configured_uri()} (deleted, or another "
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
        set_tags(run_id, {"end_reason": one_line(reason, limit=_REASON_MAX_CHARS)})
    _call(f"end run {run_id}", lambda: _client().set_terminated(run_id, status=status))


@contextlib.contextmanager
def ending_run(run_id: str, keep_on: tuple[type[BaseException], ...] = ()) -> Iterator[str]:
    """End the run when the block ends, unless code inside already ended it.

    FINISHED on normal exit, KILLED on KeyboardInterrupt (Ctrl-C/SIGTERM), FAILED on any
    other exception (its one-line message is the end reason); an exception of a ``keep_on``
    type leaves the run as it is. A run ended inside the block keeps its status: tune ends
    a pruned trial's run KILLED before raising TrialPruned.
    """
    try:
        yield run_id
    except keep_on:
        raise  # another process owns the run (e.g. it holds the training's lock): its to end
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


# Tag values of deepopt.role: an experiment's parent run (the aggregate over its seeds) and
# the runs nested under it; `mlflow ui` filters with tags.`deepopt.role` = 'experiment'.
ROLE_TAG = "deepopt.role"
_PARENT_KEY_TAG = "deepopt.parent_key"


@contextlib.contextmanager
def experiment_run(
    experiment_id: str,
    run_name: str,
    *,
    key: str,
    tags: Mapping[str, str] | None = None,
    keep_on: tuple[type[BaseException], ...] = (),
) -> Iterator[str]:
    """The parent run of an experiment's seed runs, for the block's length: the live one
    with the same ``key`` (config and data: the same runs nest under it again), else a new
    one. A new or unfinished one runs for the block and ends as it ends (``ending_run``); a
    FINISHED one stays FINISHED, so a failed retrain does not mark good results FAILED; an
    exception of a ``keep_on`` type (another process is training these seeds, and it ends
    the parent) leaves it as it is.

    MLflow has no aggregation over runs (mlflow/mlflow#3762), so the parent holds the
    mean and interval of each final metric and ``mlflow ui`` compares parents as it
    compares runs."""
    all_tags = {**(tags or {}), ROLE_TAG: "experiment", _PARENT_KEY_TAG: key}
    earlier = find_runs(experiment_id, tags={_PARENT_KEY_TAG: key, ROLE_TAG: "experiment"})
    if earlier and run_status(earlier[0]) == "FINISHED":
        set_tags(earlier[0], all_tags)
        yield earlier[0]
        return
    started = start_run(
        experiment_id, run_name, run_id=earlier[0] if earlier else None, tags=all_tags
    )
    with ending_run(started, keep_on):
        yield started


def keyed_run(
    experiment_id: str,
    run_name: str,
    *,
    key: str,
    role: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Start the one run of ``key`` (and ``role``) again, or create it: its id, and whether
    this call created it (its creator logs what the run is of). The caller ends it
    (``ending_run``); every later call continues it.

    Two processes that create it at once (without a lock between them) each keep the
    earlier run, and the later one is deleted: they go on in the same run."""
    key_tags = {ROLE_TAG: role, _PARENT_KEY_TAG: key}
    all_tags = {**(tags or {}), **key_tags}
    earlier = find_runs(experiment_id, tags=key_tags)  # newest first
    if earlier:
        return start_run(experiment_id, run_name, run_id=earlier[-1], tags=all_tags), False
    started = start_run(experiment_id, run_name, tags=all_tags)
    kept = find_runs(experiment_id, tags=key_tags)[-1]
    if kept == started:
        return started, True
    _call(f"delete run {started}", lambda: _client().delete_run(started))
    return start_run(experiment_id, run_name, run_id=kept, tags=all_tags), False


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
    """A string literal of MLflow's search filter syntax."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
