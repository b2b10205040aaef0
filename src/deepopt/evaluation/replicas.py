"""Each replica's ensemble prediction on the test split, its test metrics (for MLflow and
eval.json) and its figures (confusion.png, misclassified.png)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepopt.evaluation.figures import confusion_figure, misclassified_figure
from deepopt.evaluation.trained import Trained
from deepopt.figures import png_bytes
from deepopt.metrics import (
    classification_report,
    confusion_matrix,
    ensemble_log_probs,
    loss_and_accuracy,
    mean_and_std,
)
from deepopt.models.layout import evaluation_layout
from deepopt.training import evaluate_logits

__all__ = ["ReplicaResult", "eval_summary", "evaluate_replicas", "replica_metrics", "replica_pngs"]


@dataclass(frozen=True)
class ReplicaResult:
    replica: int
    seeds: list[int]
    log_probs: torch.Tensor  # [N, classes]: log of the members' mean softmax
    loss: float
    acc: float
    member_acc: list[float]  # each member's own test accuracy, in ensemble order
    member_loss: list[float]


def evaluate_replicas(
    trained: Trained,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
) -> list[ReplicaResult]:
    """Each replica's ensemble prediction and loss/accuracy, and each member's own.

    ``images`` [N, C, H, W] normalized; ``precision`` as the training's (bf16 autocast);
    the networks and images in the layout of ``models.layout.evaluation_layout``. The
    networks run on the images' device (moved there); each member's logits come back to
    the CPU once, for the metrics.
    """
    results = []
    for replica, members in trained.replicas().items():
        logits = []  # [N, C] each
        for member in members:
            model, images = evaluation_layout(member.model.to(images.device), images)
            logits.append(evaluate_logits(model, images, batch_size, precision).cpu())
        own = [loss_and_accuracy(torch.log_softmax(x, dim=1), labels) for x in logits]
        log_probs = ensemble_log_probs(logits)
        loss, acc = loss_and_accuracy(log_probs, labels)
        results.append(
            ReplicaResult(
                replica=replica,
                seeds=[m.seed for m in members],
                log_probs=log_probs,
                loss=loss,
                acc=acc,
                member_acc=[a for _, a in own],
                member_loss=[lo for lo, _ in own],
            )
        )
    return results


def replica_metrics(
    result: ReplicaResult, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, float]:
    """One replica's test metrics as flat MLflow metric names (test_loss, test_f1/<class>...)."""
    confusion = confusion_matrix(labels, result.log_probs.argmax(dim=1), len(class_names))
    report = classification_report(confusion, class_names)
    metrics = {"test_loss": result.loss, "test_acc": result.acc}
    metrics.update({f"test_macro_{k}": v for k, v in report["macro"].items()})
    for name, scores in report["per_class"].items():
        for key in ("precision", "recall", "f1"):
            metrics[f"test_{key}/{_metric_name(name)}"] = scores[key]
    return metrics


def _metric_name(text: str) -> str:
    # MLflow allows letters, digits, _ - . / and spaces in metric names.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def eval_summary(
    experiment: str,
    results: Sequence[ReplicaResult],
    labels: torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """The content of eval.json: means over replicas (± sample std when several), each
    replica's values, and replica 0's per-class scores and macro averages."""
    losses = [r.loss for r in results]
    accuracies = [r.acc for r in results]
    first = results[0]
    ensemble_size = len(first.seeds)
    confusion = confusion_matrix(labels, first.log_probs.argmax(dim=1), len(class_names))
    report = classification_report(confusion, class_names)
    runs = []
    for r in results:
        run: dict[str, Any] = {
            "replica": r.replica,
            "seeds": r.seeds,
            "test_loss": r.loss,
            "test_acc": r.acc,
        }
        if ensemble_size > 1:
            run["member_test_acc"] = r.member_acc
            run["member_test_loss"] = r.member_loss
        runs.append(run)
    summary: dict[str, Any] = {
        "experiment": experiment,
        "test_images": int(labels.shape[0]),
        "ensemble_size": ensemble_size,
        "replicas": len(results),
        "test_loss": mean_and_std(losses)[0],
        "test_acc": mean_and_std(accuracies)[0],
        "test_macro_precision": report["macro"]["precision"],
        "test_macro_recall": report["macro"]["recall"],
        "test_macro_f1": report["macro"]["f1"],
        "per_class": report["per_class"],
        "runs": runs,
    }
    if len(results) > 1:
        summary["test_loss_std"] = mean_and_std(losses)[1]
        summary["test_acc_std"] = mean_and_std(accuracies)[1]
    if ensemble_size > 1:
        members = [a for r in results for a in r.member_acc]
        summary["member_test_acc_mean"], summary["member_test_acc_std"] = mean_and_std(members)
    return summary


def replica_pngs(
    result: ReplicaResult,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    experiment: str,
) -> dict[str, bytes]:
    """confusion.png and misclassified.png of one replica's prediction."""
    name = experiment if result.replica == 0 else f"{experiment} (replica {result.replica})"
    confusion = confusion_matrix(labels, result.log_probs.argmax(dim=1), len(class_names))
    return {
        "confusion.png": png_bytes(
            lambda: confusion_figure(
                confusion, class_names, f"{name}: test accuracy {result.acc:.4f}"
            )
        ),
        "misclassified.png": png_bytes(
            lambda: misclassified_figure(images, labels, result.log_probs, class_names, name)
        ),
    }
