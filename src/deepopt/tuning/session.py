"""One tune session (or worker): its study opened with what its trials share, its MLflow
parent run, its summary and, for the main session, the best trial logged."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params, RunConfig, resolve_experiment
from deepopt.data import PreparedData, load_prepared
from deepopt.files import check_writable
from deepopt.paths import BASE_EXPERIMENT, BEST_PARAMS
from deepopt.training.member import normalized_splits
from deepopt.tuning.space import derive_study_name, direction, trial_config
from deepopt.tuning.storage import (
    ClaimLock,
    StorageUrl,
    StudyStorage,
    claim_lock,
    fail_orphans,
    open_storage,
)
from deepopt.tuning.study import close_dead_runs, count_trials, log_plots, open_study, write_best
from deepopt.tuning.trials import TrialSession, make_objective, run_trials

__all__ = [
    "STUDY_ROLE",
    "SessionRun",
    "Tuning",
    "announce",
    "finish_session",
    "log_best",
    "open_tuning",
    "requeue_orphans",
    "run_trials_here",
    "session_run",
]


@dataclass(frozen=True)
class Tuning:
    """A session's open study and what its trials share."""

    params: Params
    base: RunConfig  # the trials' starting config: the base or tune.experiment's
    storage: StudyStorage
    name: str  # the study's
    study: optuna.Study
    data: PreparedData
    experiment_id: str  # MLflow's
    checkpoint_root: Path  # the trials' checkpoint folders and the claim lock file
    tags: dict[str, str]  # on every MLflow run of the session
    deadline: float | None  # time.monotonic() after which no trial starts
    best_path: Path = BEST_PARAMS  # where the best trial's overrides go
    # The best trial is the best of the first this many finished ones (None: of all): a
    # study extended beyond a comparison's budget still compares at that budget.
    best_within: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.checkpoint_root / "claim.lock"


def open_tuning(
    params: Params,
    url: StorageUrl,
    *,
    study_name: str | None,
    worker: bool,
    worker_index: int,
    label: str | None = None,
    best_path: Path = BEST_PARAMS,
    best_within: int | None = None,
) -> Tuning:
    """Check the outputs can be written, open the storage, read the prepared data and
    create or resume the study: named ``study_name``, ``tune.study_name`` or derived
    (a changed space, trial config or data starts a new study, an unchanged one resumes)
    from ``label`` (default: tune.experiment or base)."""
    tune = params.tune
    base = resolve_experiment(params, tune.experiment)
    tune_dir = paths.checkpoint_dir(base.train.checkpoint_dir, "tune")
    # Before the study: it must not run for hours and then fail to write its result.
    check_writable(*([] if worker else [best_path]), tune_dir / "claim.lock")
    data = load_prepared(base.data, base.seed)  # before the storage: it may create a file
    storage = open_storage(url, tune)
    experiment = label or tune.experiment or BASE_EXPERIMENT
    start = trial_config(base, {}, tune)
    name = study_name or tune.study_name
    name = name or derive_study_name(experiment, tune.space, start, data.meta["digest"])
    tracking.configure()
    experiment_id = tracking.ensure_experiment(base.mlflow.experiment)
    goal = direction(start.early_stop)
    study = open_study(name, storage, goal, tune, params.seed, worker_index)
    tags = {
        **tracking.run_tags(dataset=base.data.name, meta=data.meta),
        "experiment": experiment,
        "tune_worker": str(worker_index),
    }
    deadline = time.monotonic() + tune.timeout if tune.timeout else None
    return Tuning(
        params,
        base,
        storage,
        name,
        study,
        data,
        experiment_id,
        tune_dir / name,
        tags,
        deadline,
        best_path,
        best_within,
    )


def run_trials_here(
    tuning: Tuning,
    parent_run_id: str,
    *,
    n_trials: int,
    threads: int | None,
    orphaned: Callable[[], bool],
) -> int:
    """Run the study's trials in this process (``threads`` torch threads, default all
    cores or train.threads), each a child run of ``parent_run_id``; how many it ran."""
    base, tune = tuning.base, tuning.params.tune
    # Before any CUDA tensor; a worker of a session has its own train.device (its GPU).
    device = devices.start_device(
        base.train.device,
        tune.precision or base.train.precision,  # the trials'
        deterministic=base.train.deterministic,
        tf32=base.train.tf32,
    )
    torch.set_num_threads(threads or base.train.threads or os.cpu_count() or 1)
    session = TrialSession(
        study_name=tuning.name,
        base=base,
        tune=tune,
        # trials fit on the train split only, on the device (moved there once)
        tensors=normalized_splits(tuning.data, device=device),
        data_meta=tuning.data.meta,
        experiment_id=tuning.experiment_id,
        parent_run_id=parent_run_id,
        tags={**tuning.tags, **devices.device_tags(device)},
        checkpoint_root=tuning.checkpoint_root,
        orphaned=orphaned,
    )
    return run_trials(
        tuning.study,
        make_objective(session),
        n_trials=n_trials,
        storage=tuning.storage,
        lock_path=tuning.lock_path,
        deadline=tuning.deadline,
        poll_s=tune.heartbeat_interval,
        orphaned=orphaned,
    )


def requeue_orphans(tuning: Tuning) -> None:
    """Without a heartbeat (journal file): fail and requeue the RUNNING trials a dead
    session left, before this session starts any worker (never two sessions at once)."""
    if tuning.storage.heartbeat:
        return
    with ClaimLock(tuning.lock_path):
        orphans = fail_orphans(tuning.study)
    if orphans:
        print(f"[tune] failed and requeued orphaned trials {orphans}", file=sys.stderr)


def announce(tuning: Tuning, n_trials: int) -> dict[str, int]:
    """Print how many of ``n_trials`` the study has finished; its counts now."""
    before = count_trials(tuning.study)
    print(
        f"[tune] study {tuning.name} in {tuning.storage.shown}: "
        f"{before['COMPLETE'] + before['PRUNED']} of {n_trials} trials finished",
        file=sys.stderr,
        flush=True,
    )
    return before


# Tag deepopt.role of a study's parent run: `mlflow ui` lists the studies with
# tags.`deepopt.role` = 'study'.
STUDY_ROLE = "study"
_SESSION_METRIC = "session_seconds"  # one step per session that ended: the session's index


@dataclass(frozen=True)
class SessionRun:
    """The study's MLflow parent run, as this session continues it."""

    run_id: str
    step: int  # this session's index among the study's sessions (0 for the first)


@contextmanager
def session_run(tuning: Tuning, worker: bool) -> Iterator[SessionRun]:
    """The study's MLflow parent run (each trial's run is its child): one per study, in
    its storage, which every session and worker of the study continues; its params (the
    tune settings, study name and storage) are the first session's, each session's own
    settings are the artifact ``sessions/<k>-<main or worker>-<pid>.json``."""
    tags = {
        **tuning.tags,
        "optuna_study": tuning.name,
        "tune_session": "worker" if worker else "main",
    }
    name = f"tune {tuning.name}"
    key = f"{tuning.storage.shown} {tuning.name}"
    # Under the claim lock (a PostgreSQL storage's locks every machine's sessions): two
    # sessions starting at once find or create the same run.
    with claim_lock(tuning.storage, tuning.lock_path, tuning.name):
        run_id, created = tracking.keyed_run(
            tuning.experiment_id, name, key=key, role=STUDY_ROLE, tags=tags
        )
    with tracking.ending_run(run_id):
        tune = tuning.params.tune.model_dump(mode="json")
        shown = tuning.storage.shown
        if created:
            tracking.log_params(run_id, {"tune": tune, "study_name": tuning.name, "storage": shown})
        ended = tracking.logged_epochs(run_id, _SESSION_METRIC)
        step = max(ended) + 1 if ended else 0
        settings = {"tune": tune, "worker": worker, "pid": os.getpid()}
        session = f"{step}-{tags['tune_session']}-{os.getpid()}"
        tracking.log_dict(run_id, settings, f"sessions/{session}.json")
        yield SessionRun(run_id, step)


def finish_session(tuning: Tuning, run: SessionRun, *, ran: int, seconds: float) -> dict[str, Any]:
    """End the runs dead trials left RUNNING, log the trial counts; the session summary."""
    closed = close_dead_runs(tuning.experiment_id, tuning.study)
    counts = count_trials(tuning.study)
    summary: dict[str, Any] = {
        "stage": "tune",
        "study": tuning.name,
        "storage": tuning.storage.shown,
        "trials": {state: n for state, n in counts.items() if n},
        "trials_this_session": ran,
        "dead_runs_closed": closed,
        "seconds": seconds,
    }
    tracking.log_metrics(
        run.run_id,
        {f"trials_{state.lower()}": n for state, n in counts.items()}
        | {_SESSION_METRIC: seconds, "trials_this_session": ran},
        step=run.step,
    )
    return summary


def log_best(tuning: Tuning, run: SessionRun) -> dict[str, Any]:
    """Write params/best.yaml and log the best trial and Optuna's plots into the parent run
    (the best so far: tags ``best.<param>``, metric ``best_value`` at the session's step);
    the summary's best-trial fields."""
    run_id = run.run_id
    best, overrides = write_best(
        tuning.params,
        tuning.study,
        tuning.base,
        tuning.storage,
        path=tuning.best_path,
        within=tuning.best_within,
    )
    assert best.value is not None  # a complete trial
    tracking.log_metrics(run_id, {"best_value": best.value}, step=run.step)
    best_run = best.user_attrs.get("mlflow_run_id", "")
    # Tags, not params: a later session of the study may find a better trial.
    best_tags = {f"best.{key}": str(value) for key, value in best.params.items()}
    tracking.set_tags(
        run_id, {**best_tags, "best_trial": str(best.number), "best_run_id": best_run}
    )
    tracking.log_artifact(run_id, tuning.best_path)
    return {
        "plots": log_plots(run_id, tuning.study),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_yaml": str(tuning.best_path),
        "overrides": overrides,
    }
