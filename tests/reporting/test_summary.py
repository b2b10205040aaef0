"""summary.json, the report stage's one-number-per-experiment metrics file for `dvc exp show`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deepopt import cli, paths
from deepopt.reporting import SUMMARY_KEY, Summary, summary_metrics
from deepopt.stats import Interval


def _summary(name: str, accuracies: list[float]) -> Summary:
    mean = sum(accuracies) / len(accuracies)
    interval = Interval(mean=mean, low=mean - 0.01, high=mean + 0.01, n=len(accuracies))
    return Summary(
        name=name,
        test_acc=interval,
        best_val_acc=interval,
        epochs_run=interval,
        stop_reasons=("max_epochs",) * len(accuracies),
        train_seconds=interval,
        replicas=len(accuracies),
        ensemble_size=1,
        first_seed=4487,
    )


def test_one_mean_test_accuracy_per_experiment_under_test_acc() -> None:
    summaries = [_summary("bn_adam", [0.84, 0.86]), _summary("nobn", [0.8, 0.81, 0.82])]
    assert summary_metrics(summaries) == {
        SUMMARY_KEY: {"bn_adam": pytest.approx(0.85), "nobn": pytest.approx(0.81)}
    }


def test_report_stage_writes_the_eval_test_accuracy_of_each_experiment(finished: Path) -> None:
    evaluation = json.loads((finished / paths.eval_metrics_path("small")).read_text("utf-8"))
    written = json.loads((finished / paths.SUMMARY_METRICS).read_text("utf-8"))
    assert written == {"test_acc": {"small": evaluation["test_acc"]}}  # one seed: its own value


def test_an_unwritable_summary_stops_the_report_before_anything_is_written(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(finished / paths.REPORT_DIR)
    (finished / paths.SUMMARY_METRICS).unlink()
    (finished / paths.SUMMARY_METRICS).mkdir()  # a folder where the file belongs
    assert cli.main(["report"]) == 1
    assert "cannot write summary.json: it is a folder" in capsys.readouterr().err
    assert not (finished / paths.REPORT_DIR).exists()
