"""deepopt's only MLflow code: the store (``store``), runs by explicit id (``runs``), what a
run records (``log``), its provenance tags (``provenance``), the machine's system metrics
(``system``) and the figures stage's run (``figures``); stages call it, training never."""

from __future__ import annotations

from deepopt.tracking.figures import FIGURES_ROLE, log_figures_run
from deepopt.tracking.log import (
    flatten_params,
    log_artifact,
    log_dataset,
    log_dict,
    log_epoch,
    log_figure,
    log_metrics,
    log_model,
    log_params,
    log_series,
    logged_epochs,
    set_tags,
)
from deepopt.tracking.provenance import git_state, run_tags
from deepopt.tracking.runs import (
    ROLE_TAG,
    EndStatus,
    end_run,
    ending_run,
    ensure_experiment,
    experiment_run,
    find_runs,
    keyed_run,
    run_exists,
    run_status,
    start_run,
    tracked_run,
)
from deepopt.tracking.store import PROBE_TIMEOUT_S, configure
from deepopt.tracking.system import system_metrics

__all__ = [
    "FIGURES_ROLE",
    "PROBE_TIMEOUT_S",
    "ROLE_TAG",
    "EndStatus",
    "configure",
    "end_run",
    "ending_run",
    "ensure_experiment",
    "experiment_run",
    "find_runs",
    "flatten_params",
    "git_state",
    "keyed_run",
    "log_artifact",
    "log_dataset",
    "log_dict",
    "log_epoch",
    "log_figure",
    "log_figures_run",
    "log_metrics",
    "log_model",
    "log_params",
    "log_series",
    "logged_epochs",
    "run_exists",
    "run_status",
    "run_tags",
    "set_tags",
    "start_run",
    "system_metrics",
    "tracked_run",
]
