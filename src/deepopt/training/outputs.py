"""What the train stage writes of an experiment's members: model.pt, run.json, the
summary (train.json) and the per-epoch history (history.csv), as plain data."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from deepopt.devices import to_cpu
from deepopt.training.member import MemberResult

__all__ = ["history_csv", "model_file", "run_info", "train_summary"]

_HISTORY_COLUMNS = ["epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds"]


def history_csv(history: list[dict[str, float]]) -> str:
    """The per-epoch history as CSV, for `dvc plots show` and the report."""
    # Diagnostics columns in forward (layer) order, as the loop recorded them.
    extra = [
        k
        for k in dict.fromkeys(k for record in history for k in record)
        if k not in _HISTORY_COLUMNS
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_HISTORY_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({**record, "epoch": int(record["epoch"])})
    return buffer.getvalue()


def train_summary(results: Sequence[MemberResult]) -> dict[str, Any]:
    """train.json: the first member's figures, and with several members every one's."""
    runs = []
    for result in results:
        history = result.fit.history
        runs.append(
            {
                "seed": result.member.seed,
                "epochs_run": result.fit.epochs_run,
                "stop_reason": result.fit.stop_reason,
                "best_val_acc": max(r["val_acc"] for r in history),
                "best_val_loss": min(r["val_loss"] for r in history),
                "final_val_acc": history[-1]["val_acc"],
                "final_val_loss": history[-1]["val_loss"],
                "train_seconds": sum(r["seconds"] for r in history),
            }
        )
    first = runs[0]
    return {**first, "runs": runs} if len(runs) > 1 else first


def _member_keys(result: MemberResult) -> dict[str, int]:
    member = result.member
    return {"seed": member.seed, "replica": member.replica, "index": member.index}


def model_file(
    experiment: str,
    model_config: dict[str, Any],
    image_shape: Sequence[int],
    num_classes: int,
    results: Sequence[MemberResult],
) -> dict[str, Any]:
    """model.pt's content: what rebuilds the networks, and each member's weights (CPU
    tensors, whichever device trained them)."""
    return {
        "experiment": experiment,
        "model_config": model_config,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "members": [
            {**_member_keys(r), "state_dict": to_cpu(r.model.state_dict())} for r in results
        ],
    }


def run_info(
    experiment: str, experiment_id: str, results: Sequence[MemberResult]
) -> dict[str, Any]:
    """run.json: the MLflow run of each member, for evaluate to log into the same runs."""
    return {
        "experiment": experiment,
        "mlflow_experiment_id": experiment_id,
        "runs": [{**_member_keys(r), "run_id": r.run_id} for r in results],
    }
