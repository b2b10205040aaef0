"""The ``tune`` stage: run (or resume) the Optuna study of ``tune``; its best trial ->
params/best.yaml (see deepopt.tuning)."""

from __future__ import annotations

from typing import Any

from deepopt.config import Params, check_name
from deepopt.config.limits import MAX_TRIALS
from deepopt.errors import ConfigError
from deepopt.tuning import parse_storage_url, tune_study

__all__ = ["main"]


def main(
    params: Params,
    worker: bool = False,
    storage: str | None = None,
    n_trials: int | None = None,
    study_name: str | None = None,
    parent_run: str | None = None,
    worker_index: int = 0,
    threads: int | None = None,
    session_pid: int | None = None,
    label: str | None = None,
    **_: object,
) -> dict[str, Any]:
    """Run trials until the study holds ``n_trials`` (default tune.n_trials) finished ones,
    in this process or ``tune.workers`` worker processes; unless ``worker``, write
    params/best.yaml. ``parent_run`` and the rest are set by a session for its workers."""
    total = params.tune.n_trials if n_trials is None else n_trials
    if not 1 <= total <= MAX_TRIALS:
        raise ConfigError(f"--n-trials: {total} must be at least 1 and at most {MAX_TRIALS}")
    if study_name is not None:
        check_name(study_name, "--study-name")  # a path part: checkpoints/tune/<study>/
    if label is not None:
        check_name(label, "--label")  # an MLflow tag and a study-name prefix
    url = parse_storage_url(
        storage or params.tune.storage, "--storage" if storage else "tune.storage"
    )
    return tune_study(
        params,
        url,
        n_trials=total,
        study_name=study_name,
        worker=worker,
        parent_run=parent_run,
        worker_index=worker_index,
        threads=threads,
        session_pid=session_pid,
        label=label,
    )
