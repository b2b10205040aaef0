"""Evaluating what train wrote: the networks of model.pt on the test split, replica by
replica (an ensemble averages its members' softmax), eval.json, figures and MLflow logging."""

from deepopt.evaluation.replicas import (
    ReplicaResult,
    eval_summary,
    evaluate_replicas,
    replica_metrics,
    replica_pngs,
)
from deepopt.evaluation.runs import check_runs_exist, log_to_mlflow
from deepopt.evaluation.trained import (
    Trained,
    TrainedMember,
    check_shapes,
    load_run_ids,
    load_trained,
    parent_run_id,
    retrain_hint,
)

__all__ = [
    "ReplicaResult",
    "Trained",
    "TrainedMember",
    "check_runs_exist",
    "check_shapes",
    "eval_summary",
    "evaluate_replicas",
    "load_run_ids",
    "load_trained",
    "log_to_mlflow",
    "parent_run_id",
    "replica_metrics",
    "replica_pngs",
    "retrain_hint",
]
