"""One tune session from start to end: open (or resume) the study, run its trials here or
in worker processes, log the session and write the best trial's overrides. The ``tune``
stage runs the study of params.yaml ``tune``; ``compare-tune`` runs one per optimizer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deepopt.config import Params
from deepopt.paths import BEST_PARAMS
from deepopt.tuning.session import (
    announce,
    finish_session,
    log_best,
    open_tuning,
    requeue_orphans,
    run_trials_here,
    session_run,
)
from deepopt.tuning.storage import StorageUrl
from deepopt.tuning.study import count_trials
from deepopt.tuning.workers import orphan_check, run_workers

__all__ = ["tune_study"]


def tune_study(
    params: Params,
    url: StorageUrl,
    *,
    n_trials: int,
    study_name: str | None = None,
    worker: bool = False,
    parent_run: str | None = None,
    worker_index: int = 0,
    threads: int | None = None,
    session_pid: int | None = None,
    label: str | None = None,
    best_path: Path = BEST_PARAMS,
    best_within: int | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``n_trials`` finished ones, in this process or
    ``tune.workers`` worker processes; unless ``worker``, write ``best_path`` from the best
    trial (of the first ``best_within`` finished ones, with it). ``parent_run`` and the
    rest are set by a session for its workers. The session's summary."""
    tuning = open_tuning(
        params,
        url,
        study_name=study_name,
        worker=worker,
        worker_index=worker_index,
        label=label,
        best_path=best_path,
        best_within=best_within,
    )
    orphaned = orphan_check(session_pid)

    def run_here(parent_run_id: str) -> int:
        return run_trials_here(
            tuning, parent_run_id, n_trials=n_trials, threads=threads, orphaned=orphaned
        )

    if worker and parent_run:  # started by a session, inside its parent run
        ran = run_here(parent_run)
        return {"stage": "tune", "study": tuning.name, "worker": worker_index, "trials_run": ran}
    if not worker:
        requeue_orphans(tuning)
    before = announce(tuning, n_trials)
    tic = time.perf_counter()
    with session_run(tuning, worker) as run:
        if worker or params.tune.workers == 1:
            ran = run_here(run.run_id)
        else:
            run_workers(
                params,
                study=tuning.name,
                storage=url.url,
                n_trials=n_trials,
                parent_run=run.run_id,
                folder=tuning.checkpoint_root,
                label=label,
            )
            ran = sum(count_trials(tuning.study).values()) - sum(before.values())
        seconds = round(time.perf_counter() - tic, 1)
        summary = finish_session(tuning, run, ran=ran, seconds=seconds)
        if worker:
            return summary
        return {**summary, **log_best(tuning, run)}
