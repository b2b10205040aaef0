"""The figures stage's MLflow run: one run per execution, tagged ``deepopt.role=figures``,
holding every PNG the stage wrote (under ``figures/`` in its artifacts) and the numbers the
figures show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from deepopt.tracking.log import log_artifact, log_metrics
from deepopt.tracking.runs import ROLE_TAG, ensure_experiment, tracked_run

__all__ = ["FIGURES_ROLE", "log_figures_run"]

FIGURES_ROLE = "figures"  # `mlflow ui`: tags.`deepopt.role` = 'figures'
_ARTIFACT_FOLDER = "figures"


def log_figures_run(
    experiment: str,
    files: Sequence[Path],
    *,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> str:
    """A new FINISHED run of MLflow experiment ``experiment`` with ``files`` as artifacts
    and ``metrics`` at step 0; its id. A failure on the way ends the run FAILED."""
    experiment_id = ensure_experiment(experiment)
    all_tags = {**tags, ROLE_TAG: FIGURES_ROLE}
    with tracked_run(experiment_id, "figures", tags=all_tags) as run_id:
        for file in files:
            log_artifact(run_id, file, _ARTIFACT_FOLDER)
        log_metrics(run_id, metrics)
    return run_id
