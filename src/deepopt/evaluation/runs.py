"""The MLflow side of evaluate (through deepopt.tracking): each replica's test metrics and
figures into its training run, or into its ensemble's own run."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from deepopt import tracking
from deepopt.errors import TrackingError
from deepopt.evaluation.replicas import ReplicaResult
from deepopt.evaluation.trained import Trained
from deepopt.stats import interval_metrics

__all__ = ["check_runs_exist", "log_to_mlflow"]


def check_runs_exist(run_ids: Iterable[str], run_file: Path) -> None:
    """TrackingError unless every run named in run.json is in the tracking store."""
    for run_id in run_ids:
        if not tracking.run_exists(run_id):
            raise TrackingError(
                f"MLflow run {run_id} named in {run_file} is not in the tracking store; "
                "use the store the training logged to (MLFLOW_TRACKING_URI) or train again"
            )


def log_to_mlflow(
    *,
    trained: Trained,
    experiment_id: str,
    run_ids: Mapping[tuple[int, int], str],
    metrics: Mapping[int, dict[str, float]],
    pngs: Mapping[int, dict[str, bytes]],
    results: Sequence[ReplicaResult],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> list[str]:
    """Log each replica's test metrics and figures; the run ids that received them.

    With one member per replica they go into that member's training run: a finished run
    takes them without being restarted, so its status and end time stay the training's.
    Ensemble members get their own ``test_acc``/``test_loss``, and each replica's ensemble
    gets one extra run named after the experiment, tagged ``ensemble_members`` (the members'
    run ids) and ``ensemble_size``, holding the ensemble's metrics and figures; evaluating
    again continues that run instead of adding another. The experiment's parent run (train
    made it) gets each test metric's mean and 95 % interval over the replicas.
    """
    logged = []
    for result in results:
        members = [run_ids[(result.replica, k)] for k in range(len(result.seeds))]
        if len(members) == 1:
            target = members[0]
            _log_replica(target, metrics[result.replica], pngs[result.replica])
        else:
            for run_id, acc, loss in zip(
                members, result.member_acc, result.member_loss, strict=True
            ):
                tracking.log_metrics(run_id, {"test_acc": acc, "test_loss": loss})
            target = _ensemble_run(
                trained.experiment, experiment_id, members, result, tags, parent_run_id
            )
            with tracking.ending_run(target):
                # Only what the member runs fix: evaluating again after an unrelated
                # params.yaml edit must not meet a "changed param" in this run.
                tracking.log_params(
                    target,
                    {
                        "model": trained.model_config.model_dump(mode="json"),
                        "ensemble_size": len(members),
                        "seeds": ",".join(str(s) for s in result.seeds),
                    },
                )
                _log_replica(target, metrics[result.replica], pngs[result.replica])
        logged.append(target)
    if parent_run_id is not None:
        keys = ("test_acc", "test_loss", "test_macro_f1")
        values = {k: [metrics[r.replica][k] for r in results] for k in keys}
        tracking.log_metrics(parent_run_id, interval_metrics(values))
    return logged


def _log_replica(run_id: str, metrics: Mapping[str, float], pngs: Mapping[str, bytes]) -> None:
    tracking.log_metrics(run_id, metrics)
    with tempfile.TemporaryDirectory(prefix="deepopt-eval-") as folder:
        for artifact_file, blob in pngs.items():
            path = Path(folder) / artifact_file
            path.write_bytes(blob)
            tracking.log_artifact(run_id, path)


def _ensemble_run(
    experiment: str,
    experiment_id: str,
    members: list[str],
    result: ReplicaResult,
    tags: Mapping[str, str],
    parent_run_id: str | None,
) -> str:
    """The ensemble's own run: the earlier one of the same members if any, else a new one,
    nested under the experiment's parent run beside its members."""
    ensemble_tags = {"ensemble_members": ",".join(members), "ensemble_size": str(len(members))}
    earlier = tracking.find_runs(experiment_id, tags=ensemble_tags)
    return tracking.start_run(
        experiment_id,
        f"{experiment} replica {result.replica} ensemble",
        run_id=earlier[0] if earlier else None,
        parent_run_id=parent_run_id,
        tags={
            **tags,
            **ensemble_tags,
            tracking.ROLE_TAG: "ensemble",
            "replica": str(result.replica),
            "seeds": ",".join(str(s) for s in result.seeds),
        },
    )
