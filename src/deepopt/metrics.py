"""Test-set metrics as pure functions of logits and labels (no I/O, no tracking).

An ensemble predicts the average of its members' softmax outputs (the lecture's ensemble
row); ``ensemble_log_probs`` returns the log of that average, computed stably as
logsumexp over the members' log-softmax minus log K, so one net (K=1) gives exactly its
own log-softmax and the loss is the usual cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "class_scores",
    "classification_report",
    "confusion_matrix",
    "ensemble_log_probs",
    "loss_and_accuracy",
    "loss_and_accuracy_of_logits",
    "mean_and_std",
]


def ensemble_log_probs(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean_k softmax(logits_k)) for K members' logits [N, C] each: [N, C]."""
    if len(member_logits) == 0:
        raise ValueError("ensemble_log_probs needs the logits of at least one member")
    log_probs = torch.stack([torch.log_softmax(x.float(), dim=1) for x in member_logits])  # [K,N,C]
    return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))


def loss_and_accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood (cross-entropy) and accuracy of log-probabilities [N, C]."""
    loss = torch.nn.functional.nll_loss(log_probs, labels).item()
    accuracy = (log_probs.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


def loss_and_accuracy_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and accuracy of raw logits [N, C] (the training loop's validation)."""
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """int64 [C, C] counts: row = true class, column = predicted class (sklearn's layout)."""
    pairs = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def class_scores(confusion: torch.Tensor) -> dict[str, list[float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix [C, C].

    A class never predicted has precision 0, one never present has recall 0 and
    F1 is 0 when precision + recall is 0 (sklearn's zero_division=0).
    """
    counts = confusion.to(torch.float64)
    true_positives = counts.diagonal()
    predicted = counts.sum(dim=0)  # column sums: how often each class was predicted
    support = counts.sum(dim=1)  # row sums: how often each class is the truth
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_positives / support.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), 0.0)
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(n) for n in support.tolist()],
    }


def classification_report(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class scores keyed by class name, and their unweighted (macro) averages."""
    if len(class_names) != confusion.shape[0]:
        raise ValueError(
            f"{len(class_names)} class names for a {confusion.shape[0]}-class confusion matrix"
        )
    scores = class_scores(confusion)
    per_class = {
        name: {key: values[i] for key, values in scores.items()}
        for i, name in enumerate(class_names)
    }
    macro = {key: sum(scores[key]) / len(class_names) for key in ("precision", "recall", "f1")}
    return {"per_class": per_class, "macro": macro}


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_and_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)
