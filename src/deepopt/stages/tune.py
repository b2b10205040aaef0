"""The ``tune`` stage: run (or resume) the Optuna study of ``tune``; its best trial ->
params/best.yaml (see deepopt.tuning)."""

from __future__ import annotations

import time
from typing import Any

from deepopt.config import Params, check_name
from deepopt.config.limits import MAX_TRIALS
from deepopt.errors import ConfigError
from deepopt.tuning import (
    announce,
    count_trials,
    finish_session,
    log_best,
    open_tuning,
    orphan_check,
    parse_storage_url,
    requeue_orphans,
    run_trials_here,
    run_workers,
    session_run,
)

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
    url = parse_storage_url(
        storage or params.tune.storage, "--storage" if storage else "tune.storage"
    )
    tuning = open_tuning(
        params, url, study_name=study_name, worker=worker, worker_index=worker_index
    )
    orphaned = orphan_check(session_pid)

    def run_here(parent_run_id: str) -> int:
        return run_trials_here(
            tuning, parent_run_id, n_trials=total, threads=threads, orphaned=orphaned
        )

    if worker and parent_run:  # started by a session, inside its parent run
        ran = run_here(parent_run)
        return {"stage": "tune", "study": tuning.name, "worker": worker_index, "trials_run": ran}
    if not worker:
        requeue_orphans(tuning)
    before = announce(tuning, total)
    tic = time.perf_counter()
    with session_run(tuning, worker) as run_id:
        if worker or params.tune.workers == 1:
            ran = run_here(run_id)
        else:
            run_workers(
                params,
                study=tuning.name,
                storage=url.url,
                n_trials=total,
                parent_run=run_id,
                folder=tuning.checkpoint_root,
            )
            ran = sum(count_trials(tuning.study).values()) - sum(before.values())
        seconds = round(time.perf_counter() - tic, 1)
        summary = finish_session(tuning, run_id, ran=ran, seconds=seconds)
        if worker:
            return summary
        return {**summary, **log_best(tuning, run_id)}
