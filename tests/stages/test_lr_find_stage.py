"""The lr-find stage end to end on tiny real data: its files, its MLflow run, the same
results twice, another experiment, bad input, and the report's learning-rate section."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from deepopt import cli

pytestmark = pytest.mark.slow

SHORT = {"num_iter": 30}  # 30 batches of 50 of the 450 tiny training images


def _lr_find(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert cli.main(["lr-find", *args]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return summary


def _written(work: Path, name: str = "base") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((work / "lr_find" / f"{name}.json").read_text())
    return data


def test_writes_the_suggestion_the_curve_and_the_plot_and_records_them_in_mlflow(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(lr_find=SHORT)
    summary = _lr_find(capsys)
    written = _written(work)
    assert summary == {
        "stage": "lr_find",
        "experiment": "base",
        "suggestion": written["suggestion"],
        "lr_used": 0.02,
    }
    assert written["optimizer"] == "nesterov" and written["batch_size"] == 50
    assert written["lr_used"] == written["base_lr"] == 0.02
    assert written["num_iter"] == 30 and written["start_lr"] == 1e-7 and written["end_lr"] == 10
    assert 1e-7 <= written["suggestion"] <= 10.0
    assert 1 <= written["batches"] <= 30
    rows = (work / "lr_find/base.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss" and len(rows) == 1 + written["batches"]
    assert float(rows[1].split(",")[1]) == 1e-7
    assert (work / "lr_find/base.png").read_bytes().startswith(b"\x89PNG")

    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "tags.`deepopt.role` = 'lr_find'")
    assert run.info.run_id == written["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "base lr_find" and run.data.tags["experiment"] == "base"
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["lr_find.num_iter"] == "30"
    assert run.data.metrics["suggested_lr"] == written["suggestion"]
    for key in ("lr", "loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(written["batches"])), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"base.json", "base.csv", "base.png"}

    # The same network, data and seed: the same curve and the same plot, byte for byte.
    png = (work / "lr_find/base.png").read_bytes()
    _lr_find(capsys)
    again = _written(work)
    assert {k: v for k, v in again.items() if k != "run_id"} == {
        k: v for k, v in written.items() if k != "run_id"
    }
    assert (work / "lr_find/base.png").read_bytes() == png


def test_an_experiment_gets_its_own_network_optimizer_and_files(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(lr_find=SHORT, experiments={"small": {"optim": {"name": "adam", "lr": 0.005}}})
    summary = _lr_find(capsys, "--experiment", "small")
    written = _written(work, "small")
    assert summary["experiment"] == "small" and written["optimizer"] == "adam"
    assert written["lr_used"] == 0.005 and written["base_lr"] == 0.02
    assert not (work / "lr_find/base.json").exists()


@pytest.mark.parametrize(
    ("args", "sections", "message"),
    [
        (["--experiment", "nope"], {}, "experiment 'nope' is not in params.yaml experiments"),
        (["--experiment", "../x"], {}, "--experiment: '../x' is not a plain name"),
        ([], {"lr_find": {"start_lr": 1.0, "end_lr": 0.1}}, "lr_find.start_lr (1) must be below"),
        ([], {"lr_find": {"num_iter": 2}}, "lr_find.num_iter: 2 is out of range"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    workspace: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    sections: dict[str, Any],
    message: str,
) -> None:
    work = workspace(**sections)
    assert cli.main(["lr-find", *args]) == 2  # ConfigError
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not (work / "lr_find").exists()


def test_the_report_shows_the_suggestion_beside_the_base_and_the_tuned_rate(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = finished / "reports/lecture.md"
    assert "Not run: `deepopt lr-find`" in report.read_text()  # the fixture ran no test

    params = yaml.safe_load((finished / "params.yaml").read_text())
    params["lr_find"] = SHORT
    (finished / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["lr-find"]) == 0
    suggestion = _written(finished)["suggestion"]
    assert cli.main(["report"]) == 0
    text = report.read_text()
    assert "## Learning rate: range test" in text
    assert f"| suggested by the range test (fastai's valley) | {suggestion:.3g} |" in text
    assert "| optim.lr of the base config (the matrix's unless overridden) | 0.02 |" in text
    assert "| tuned (params/best.yaml) | not tuned yet |" in text
    assert "](../lr_find/base.png)" in text

    best = finished / "params/best.yaml"
    best.parent.mkdir()
    best.write_text("optim: {name: momentum, lr: 0.0375}\n", encoding="utf-8")
    assert cli.main(["report"]) == 0
    assert "| tuned (params/best.yaml, momentum) | 0.0375 |" in report.read_text()
    capsys.readouterr()
