"""summary.json: one number per experiment, its mean test accuracy over the replicas, for
``dvc exp show``.

Every experiment's train.json and eval.json hold eight or more figures each, so
``dvc exp show`` of the whole matrix has well over a hundred columns. This file is the one
a terminal can show: nested under ``test_acc``, so DVC names its columns
``test_acc.<experiment>`` and a ``--keep 'test_acc\\.'`` regex picks them out (the README
gives the commands). The intervals and n stay in reports/lecture.md and eval.json.
"""

from __future__ import annotations

from collections.abc import Sequence

from deepopt.reporting.results import Summary

__all__ = ["SUMMARY_KEY", "summary_metrics"]

SUMMARY_KEY = "test_acc"  # DVC flattens it into the column names: test_acc.<experiment>


def summary_metrics(summaries: Sequence[Summary]) -> dict[str, dict[str, float]]:
    """``{"test_acc": {experiment: mean test accuracy over its replicas}}`` (pure)."""
    return {SUMMARY_KEY: {summary.name: summary.test_acc.mean for summary in summaries}}
