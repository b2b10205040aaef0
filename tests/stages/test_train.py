"""The train stage end to end on tiny real data: outputs, MLflow contents, determinism,
kill -9 / Ctrl-C and resume, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from deepopt import cli

pytestmark = pytest.mark.slow


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert cli.main(["train", "--experiment", "small", *args]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return summary


def _history(work: Path, name: str = "small") -> list[dict[str, str]]:
    """history.csv rows without the wall-clock column."""
    lines = (work / "plots" / name / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _runs(work: Path, role: str = "seed") -> list[Any]:
    """The seed runs (role "seed") or the experiments' parent runs ("experiment")."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], f"tags.`deepopt.role` = '{role}'"))


def test_outputs_and_mlflow_run(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    summary = _train(capsys)
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "max_epochs"

    saved = torch.load(work / "models/small/model.pt", weights_only=True)
    assert saved["experiment"] == "small" and len(saved["members"]) == 1
    weights = saved["members"][0]["state_dict"].values()
    assert all(t.is_contiguous() for t in weights), "saved NCHW whatever the training layout"
    metrics = json.loads((work / "metrics/small/train.json").read_text())
    assert metrics["epochs_run"] == 3 and 0.0 < metrics["best_val_acc"] <= 1.0
    assert len(_history(work)) == 3

    run_info = json.loads((work / "models/small/run.json").read_text())
    (run,) = _runs(work)
    assert run.info.run_id == run_info["runs"][0]["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "small seed 4487"
    (parent,) = _runs(work, "experiment")
    assert parent.info.run_id == run_info["parent_run_id"] == run.data.tags["mlflow.parentRunId"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "small"
    assert parent.data.metrics["best_val_acc"] == metrics["best_val_acc"]
    assert parent.data.metrics["n_seeds"] == 1
    assert "best_val_acc_ci95_low" not in parent.data.metrics  # one seed: no interval
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["optim.name"] == "nesterov"
    assert run.data.params["train.epochs"] == "3"
    for tag in ("git_commit", "dataset", "data_digest", "torch_version", "seed", "stop_reason"):
        assert tag in run.data.tags, tag
    assert run.data.tags["matrix"] == "deepopt" and run.data.tags["stop_reason"] == "max_epochs"
    client = MlflowClient()
    for key in ("loss", "acc", "val_loss", "val_acc", "lr", "seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2], key  # one value per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.png", "config.json"} <= artifacts
    assert run.inputs.dataset_inputs, "the prepared data is logged as the run's input"
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


def test_same_params_give_identical_metrics(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    work = workspace(train={"checkpoint_dir": str(tmp_path / "ckpt-a")})
    _train(capsys)
    first = _history(work)
    workspace(train={"checkpoint_dir": str(tmp_path / "ckpt-b")})  # no checkpoint to reuse
    _train(capsys)
    assert _history(work) == first


def _spawn(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deepopt.cli", "train", "--experiment", "small"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_epoch(process: subprocess.Popen[str], epoch: int, total: int) -> None:
    """Read the progress lines until ``epoch`` has been checkpointed and logged."""
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if f"epoch {epoch}/{total}" in line:
            return
        assert time.monotonic() < deadline, "training made no progress"
    raise AssertionError(f"process ended before epoch {epoch}: exit {process.wait()}")


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_training_resumes_to_the_uninterrupted_result(
    workspace: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    kill_signal: signal.Signals,
) -> None:
    epochs = {"epochs": 6, "checkpoint_dir": str(tmp_path / "reference")}
    work = workspace(train=epochs)
    _train(capsys)
    reference = _history(work)

    workspace(train={**epochs, "checkpoint_dir": str(tmp_path / "interrupted")})
    process = _spawn(work)
    _wait_for_epoch(process, 2, 6)
    process.send_signal(kill_signal)
    code = process.wait(timeout=60)
    if kill_signal == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130  # Ctrl-C / SIGTERM: recorded, then exit 130
        assert process.stderr is not None and "Traceback" not in process.stderr.read()
    killed_runs = [r for r in _runs(work) if r.data.tags.get("seed")]
    interrupted = killed_runs[0]  # newest first
    expected_status = "RUNNING" if kill_signal == signal.SIGKILL else "KILLED"
    assert interrupted.info.status == expected_status

    _train(capsys)
    assert _history(work) == reference
    resumed = MlflowClient().get_run(interrupted.info.run_id)
    assert resumed.info.status == "FINISHED"  # the same run, continued
    assert len(_runs(work)) == 2  # the reference run and the interrupted-then-resumed one
    # One parent per checkpoint folder (it is part of the config), the interrupted one
    # continued and ended too.
    parents = _runs(work, "experiment")
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    steps = [m.step for m in MlflowClient().get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(6))


def test_diverging_run_fails_cleanly(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(model={"batchnorm": False}, optim={"lr": 5.0})  # valid, yet diverges
    assert cli.main(["train", "--experiment", "small"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged" in err and "Traceback" not in err
    (run,) = _runs(work)
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "diverged"
    assert "NaN" in run.data.tags["end_reason"]
    assert not (work / "models" / "small" / "model.pt").exists()


def test_missing_prepared_data_is_a_one_line_error(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    (work / "data" / "prepared" / "train.pt").unlink()
    assert cli.main(["train", "--experiment", "small"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prepare" in err


def test_training_again_after_it_finished_reuses_the_member_and_its_run(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    first = _train(capsys)
    outputs = ("models/small/model.pt", "metrics/small/train.json", "plots/small/history.csv")
    written = {name: (work / name).read_bytes() for name in outputs}
    (run,) = _runs(work)
    (work / "models" / "small" / "model.pt").unlink()  # as `dvc repro` after a lost output

    assert _train(capsys) == first
    assert {name: (work / name).read_bytes() for name in outputs} == written
    (again,) = _runs(work)  # no new run, and the finished one untouched
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.info.end_time == run.info.end_time and again.data.metrics == run.data.metrics


def test_a_finished_checkpoint_whose_run_was_deleted_trains_a_complete_new_run(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    first = _train(capsys)
    (run,) = _runs(work)
    MlflowClient().delete_run(run.info.run_id)

    assert _train(capsys) == {**first, "train_seconds": _train_seconds(work)}
    (new,) = _runs(work)
    assert new.info.run_id != run.info.run_id and new.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(new.info.run_id, "val_loss")]
    assert sorted(steps) == [0, 1, 2]


def _train_seconds(work: Path) -> float:
    seconds: float = json.loads((work / "metrics/small/train.json").read_text())["train_seconds"]
    return seconds
