"""The compare pipeline end to end on tiny data: two optimizers, budget 2, two seeds, the
four stages through the real CLI; then the budget fairness (a short study is refused, the
tune stage tops it up, an extended one is flagged and compares at the budget)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from deepopt import cli, paths

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))

TINY_COMPARE = {
    "optimizers": ["sgd", "adam"],
    "budget": 2,
    "epochs": 2,
    "seeds": 2,
    "workers": 1,
    "target_val_acc": 0.3,
    "space": {"schedule": {"constant": {}, "inverse_time": {"decay": {"low": 1e-4, "high": 1e-2}}}},
}


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _finished(study_name: str) -> int:
    study = optuna.load_study(study_name=study_name, storage="sqlite:///compare/optuna.db")
    return sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)


def _run(*args: str) -> None:
    assert cli.main(list(args)) == 0, args


@pytest.fixture()
def compared(workspace: Callable[..., Path]) -> Path:
    work = workspace(compare=TINY_COMPARE, mlflow={"log_model": False})
    _run("compare-seeds", "--settings", "default")
    _run("compare-tune")
    _run("compare-seeds", "--settings", "tuned")
    _run("compare-report")
    return work


def _dvc(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [DVC, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_compare_dvc_yaml_writes_the_paths_the_code_writes() -> None:
    stages = _yaml(REPO / "compare" / "dvc.yaml")["stages"]
    assert list(stages) == ["defaults", "tune", "tuned", "report"]
    assert {stage["wdir"] for stage in stages.values()} == {".."}
    assert _names(stages["defaults"]["outs"]) == [str(paths.compare_runs_path("default"))]
    assert _names(stages["tuned"]["outs"]) == [str(paths.compare_runs_path("tuned"))]
    best = str(paths.compare_best_path("sgd").parent)
    assert _names(stages["tune"]["outs"]) == ["compare/optuna.db", best, str(paths.COMPARE_STUDIES)]
    assert best in stages["tuned"]["deps"]
    assert _names(stages["report"]["outs"]) == [
        str(paths.COMPARE_REPORT),
        str(paths.COMPARE_REPORT_HTML),
        str(paths.COMPARE_PROFILE_PLOT),
    ]
    assert _names(stages["report"]["metrics"]) == [str(paths.COMPARE_METRICS)]
    params = _yaml(REPO / "params.yaml")
    assert params["compare"]["storage"] == "sqlite:///compare/optuna.db"


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def _names(entries: list[Any]) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


@pytest.mark.slow
def test_dvc_repro_compare_two_optimizers_end_to_end(workspace: Callable[..., Path]) -> None:
    """`dvc repro compare/dvc.yaml` as the README runs it, in a workspace with the code."""
    work = workspace(compare=TINY_COMPARE, mlflow={"log_model": False})
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "compare").mkdir()
    shutil.copy(REPO / "compare" / "dvc.yaml", work / "compare" / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    assert _dvc("init", "-q", cwd=work).returncode == 0
    done = _dvc("repro", "compare/dvc.yaml", cwd=work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("defaults", "tune", "tuned", "report"):
        assert f"Running stage 'compare/dvc.yaml:{stage}'" in done.stdout
    again = _dvc("repro", "compare/dvc.yaml", cwd=work)  # nothing changed: nothing runs
    assert again.returncode == 0 and "Running stage" not in again.stdout
    _check_outputs()


def _check_outputs() -> None:
    default = _read(paths.compare_runs_path("default"))
    tuned = _read(paths.compare_runs_path("tuned"))
    studies = _read(paths.COMPARE_STUDIES)
    assert set(default["optimizers"]) == set(tuned["optimizers"]) == {"sgd", "adam"}
    assert default["seeds"] == tuned["seeds"] == [4488, 4489]  # the trials train with 4487
    for runs in (default, tuned):
        for name, entry in runs["optimizers"].items():
            assert [run["seed"] for run in entry["runs"]] == [4488, 4489]
            for run in entry["runs"]:
                assert run["diverged"] or 0.0 <= run["test_acc"] <= 1.0
                assert run["diverged"] or len(run["val_acc"]) == run["epochs_run"] <= 2
            assert entry["config"]["optim"]["name"] == name
    assert default["optimizers"]["adam"]["config"]["optim"]["lr"] == 0.001
    # The tuned config is the study's best trial (of its first budget ones).
    for name in ("sgd", "adam"):
        study = studies["studies"][name]
        assert study["finished"] == study["complete"] + study["pruned"] == 2
        assert _finished(study["study"]) == 2
        assert not study["extended"]
        lr = tuned["optimizers"][name]["config"]["optim"]["lr"]
        assert lr == pytest.approx(study["best_params"]["lr"])
    report = paths.COMPARE_REPORT.read_text(encoding="utf-8")
    assert "| sgd |" in report and "| adam |" in report
    assert paths.COMPARE_PROFILE_PLOT.stat().st_size > 1000
    page = paths.COMPARE_REPORT_HTML.read_text(encoding="utf-8")  # the same, one page
    assert "<h2>Verdict</h2>" in page and "<td>adam</td>" in page
    assert 'src="data:image/png;base64,' in page
    metrics = _read(paths.COMPARE_METRICS)
    assert set(metrics["test_acc"]["tuned"]) == {"sgd", "adam"}
    # MLflow: one parent run per optimizer and settings, its seed runs nested under it.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt-compare")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    by_name = {run.info.run_name: run for run in runs}
    for name in ("sgd", "adam"):
        for settings in ("default", "tuned"):
            parent = by_name[f"{name} {settings}"]
            assert parent.data.metrics["n_seeds"] + parent.data.metrics["diverged_seeds"] == 2
            for seed in (4488, 4489):
                child = by_name[f"{name} {settings} seed {seed}"]
                assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    sessions = [run for run in runs if run.info.run_name.startswith("tune compare-")]
    assert {run.data.tags["optuna_study"] for run in sessions} == {
        studies["studies"][name]["study"] for name in ("sgd", "adam")
    }


def test_budgets_are_checked_topped_up_and_flagged(
    compared: Path, workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    studies = _read(paths.COMPARE_STUDIES)["studies"]
    # A larger budget: the studies hold 2 of 3; the report refuses to compare them.
    workspace(compare={**TINY_COMPARE, "budget": 3}, mlflow={"log_model": False})
    capsys.readouterr()
    assert cli.main(["compare-report"]) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and studies["sgd"]["study"] in error and "budget 3" in error
    # The tune stage tops every study up to the budget (the same studies: one trial more),
    # here in two worker processes, which tag their trials' runs as the session does.
    workspace(compare={**TINY_COMPARE, "budget": 3, "workers": 2}, mlflow={"log_model": False})
    _run("compare-tune")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt-compare")
    assert experiment is not None
    trials = client.search_runs(
        [experiment.experiment_id], "tags.optuna_trial = '2'", max_results=50
    )
    assert sorted(run.data.tags["experiment"] for run in trials) == ["compare-adam", "compare-sgd"]
    workspace(compare={**TINY_COMPARE, "budget": 3}, mlflow={"log_model": False})
    topped = _read(paths.COMPARE_STUDIES)["studies"]
    for name in ("sgd", "adam"):
        assert topped[name]["study"] == studies[name]["study"]
        assert topped[name]["finished"] == _finished(studies[name]["study"]) == 3
    _run("compare-seeds", "--settings", "tuned")
    _run("compare-report")
    # Back to budget 2: the studies hold 3, more than the budget. Flagged, and the best
    # is taken from the first 2 finished trials, as before the top-up.
    workspace(compare=TINY_COMPARE, mlflow={"log_model": False})
    _run("compare-tune")
    extended = _read(paths.COMPARE_STUDIES)["studies"]
    for name in ("sgd", "adam"):
        assert extended[name]["extended"] and extended[name]["finished"] == 3
        assert extended[name]["best_trial"] == studies[name]["best_trial"]
        assert extended[name]["best_params"] == studies[name]["best_params"]
    _run("compare-seeds", "--settings", "tuned")
    _run("compare-report")
    assert "extended" in paths.COMPARE_REPORT.read_text(encoding="utf-8")
    # One MLflow parent run per study, which all three sessions continued: its trials
    # nested under it, a step of the session metrics and a settings file per session.
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    for name in ("sgd", "adam"):
        study = studies[name]["study"]
        (parent,) = [
            run
            for run in runs
            if run.data.tags.get("optuna_study") == study and "optuna_trial" not in run.data.tags
        ]
        assert parent.info.status == "FINISHED" and parent.data.tags["deepopt.role"] == "study"
        children = {
            run.data.tags["optuna_trial"]
            for run in runs
            if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert children == {"0", "1", "2"}
        history = client.get_metric_history(parent.info.run_id, "trials_complete")
        assert [metric.step for metric in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
        sessions = client.list_artifacts(parent.info.run_id, "sessions")
        assert [Path(a.path).name.split("-")[0] for a in sessions] == ["0", "1", "2"]


def test_tuned_before_tune_is_one_line(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    workspace(compare=TINY_COMPARE)
    assert cli.main(["compare-seeds", "--settings", "tuned"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deepopt: error: compare/best/sgd.yaml: not found; run")
    assert "\n" not in error
    assert not paths.compare_runs_path("tuned").exists()
