"""Hyperparameter tuning: an Optuna study over ``tune.space`` whose trials are tracked
training runs, shared by worker processes and machines; its best trial -> params/best.yaml."""

from deepopt.tuning.run import tune_study
from deepopt.tuning.session import (
    Tuning,
    announce,
    finish_session,
    log_best,
    open_tuning,
    requeue_orphans,
    run_trials_here,
    session_run,
)
from deepopt.tuning.space import (
    best_overrides,
    config_overrides,
    derive_study_name,
    direction,
    objective_value,
    sample_overrides,
    trial_config,
)
from deepopt.tuning.storage import (
    StorageUrl,
    StudyStorage,
    claim_lock,
    open_storage,
    parse_storage_url,
)
from deepopt.tuning.study import best_trial, build_pruner, build_sampler, count_trials, open_study
from deepopt.tuning.trials import STATE_TAG, pruning_hook, run_trials
from deepopt.tuning.workers import orphan_check, run_workers

__all__ = [
    "STATE_TAG",
    "StorageUrl",
    "StudyStorage",
    "Tuning",
    "announce",
    "best_overrides",
    "best_trial",
    "build_pruner",
    "build_sampler",
    "claim_lock",
    "config_overrides",
    "count_trials",
    "derive_study_name",
    "direction",
    "finish_session",
    "log_best",
    "objective_value",
    "open_storage",
    "open_study",
    "open_tuning",
    "orphan_check",
    "parse_storage_url",
    "pruning_hook",
    "requeue_orphans",
    "run_trials",
    "run_trials_here",
    "run_workers",
    "sample_overrides",
    "session_run",
    "trial_config",
    "tune_study",
]
