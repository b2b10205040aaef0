"""What the train stage writes of an experiment's members: model.pt, run.json, the
summary (train.json) and the per-epoch history (history.csv), as plain data."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from deepopt.devices import to_cpu
from deepopt.training.member import MemberResult

__all__ = [
    "history_csv",
    "model_file",
    "replica_values",
    "run_info",
    "runs_csv",
    "train_summary",
]

_HISTORY_COLUMNS = ["epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds"]
_RUN_COLUMNS = ["replica", "member", "seed"]


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


def _final_layers(record: dict[str, float], prefix: str) -> dict[str, float]:
    """The last epoch's per-layer diagnostics of one kind, layers in forward order."""
    return {k.removeprefix(prefix): v for k, v in record.items() if k.startswith(prefix)}


def train_summary(results: Sequence[MemberResult]) -> dict[str, Any]:
    """train.json: the first member's figures at the top (as `dvc metrics show` shows one
    number per key), and every member's under "runs", replica by replica, for the report's
    intervals and paired comparisons."""
    runs = []
    for result in results:
        history = result.fit.history
        last = history[-1]
        run: dict[str, Any] = {
            "seed": result.member.seed,
            "replica": result.member.replica,
            "member": result.member.index,
            "epochs_run": result.fit.epochs_run,
            "stop_reason": result.fit.stop_reason,
            "best_val_acc": max(r["val_acc"] for r in history),
            "best_val_loss": min(r["val_loss"] for r in history),
            "final_val_acc": last["val_acc"],
            "final_val_loss": last["val_loss"],
            "final_loss": last["loss"],
            "final_acc": last["acc"],
            "train_seconds": sum(r["seconds"] for r in history),
        }
        for kind in ("grad_norm", "zero_fraction"):
            layers = _final_layers(last, f"{kind}/")
            if layers:
                run[f"final_{kind}"] = layers
        runs.append(run)
    first = {k: v for k, v in runs[0].items() if not isinstance(v, dict)}
    return {**first, "runs": runs}


def runs_csv(results: Sequence[MemberResult]) -> str:
    """Every member's per-epoch history in one CSV (replica, member, seed, then the
    history columns), for the report's curves with a band over the seeds."""
    records = [
        {"replica": r.member.replica, "member": r.member.index, "seed": r.member.seed, **record}
        for r in results
        for record in r.fit.history
    ]
    extra = [
        k
        for k in dict.fromkeys(k for record in records for k in record)
        if k not in _HISTORY_COLUMNS and k not in _RUN_COLUMNS
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=[*_RUN_COLUMNS, *_HISTORY_COLUMNS, *extra], lineterminator="\n"
    )
    writer.writeheader()
    for record in records:
        writer.writerow({**record, "epoch": int(record["epoch"])})
    return buffer.getvalue()


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
    experiment: str,
    experiment_id: str,
    results: Sequence[MemberResult],
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """run.json: the MLflow run of each member and of the experiment's parent run, for
    evaluate to log into the same runs."""
    info: dict[str, Any] = {
        "experiment": experiment,
        "mlflow_experiment_id": experiment_id,
        "runs": [{**_member_keys(r), "run_id": r.run_id} for r in results],
    }
    if parent_run_id is not None:
        info["parent_run_id"] = parent_run_id
    return info


def replica_values(summary: dict[str, Any]) -> dict[str, list[float]]:
    """Each replica's value of the final training metrics (pure): accuracies, losses and
    epochs are its members' mean, train_seconds their sum (what the replica cost)."""
    replicas: dict[int, list[dict[str, Any]]] = {}
    for run in summary["runs"]:
        replicas.setdefault(int(run["replica"]), []).append(run)
    values: dict[str, list[float]] = {}
    for key in ("best_val_acc", "best_val_loss", "final_val_acc", "final_loss", "epochs_run"):
        values[key] = [sum(r[key] for r in rs) / len(rs) for rs in replicas.values()]
    values["train_seconds"] = [sum(r["train_seconds"] for r in rs) for rs in replicas.values()]
    return values
