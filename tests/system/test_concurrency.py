"""Two processes, one workspace: a second `deepopt train` of the same experiment refuses at
once while the first trains (the checkpoint folder's lock), and a second `dvc repro` is
refused by DVC's own locks; either way the first finishes and nothing is left broken."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow changes its sqlite sessions under pytest
    return env


def _deepopt(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deepopt.cli", *argv],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


EPOCHS = 5


def test_a_second_train_of_the_same_experiment_refuses_while_the_first_trains(
    finished: Path,
) -> None:
    shutil.rmtree(finished / "checkpoints")  # the first trains from scratch
    params = yaml.safe_load((finished / "params.yaml").read_text())
    params["train"]["epochs"] = EPOCHS  # time enough left after its first epoch to stop it
    (finished / "params.yaml").write_text(yaml.safe_dump(params))
    seed = params["seed"]  # its one member's
    first = _deepopt("train", "--experiment", "small", cwd=finished)
    try:
        assert first.stderr is not None
        line = first.stderr.readline()
        while line and f"epoch 1/{EPOCHS}" not in line:
            line = first.stderr.readline()
        assert f"epoch 1/{EPOCHS}" in line, "the first train ended before its first epoch"
        first.send_signal(signal.SIGSTOP)  # holds its lock, mid-training, for as long as needed
        second = _deepopt("train", "--experiment", "small", cwd=finished)
        _, err = second.communicate(timeout=300)
        first.send_signal(signal.SIGCONT)
        _, rest = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 1
    assert err.strip().splitlines() == [
        f"deepopt: error: cannot train small into checkpoints/small: another deepopt process "
        f"(pid {first.pid}: training small seed {seed}) is using it; wait for it to finish or stop "
        "it, then run this again"
    ]
    assert first.returncode == 0, rest[-2000:]
    # The first alone trained and recorded: a finished checkpoint, one MLflow run of every epoch.
    (checkpoint,) = (finished / "checkpoints" / "small").glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["finished"] and saved["loop"]["epochs_done"] == EPOCHS
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'small seed 4487'")
    newest = max(runs, key=lambda run: run.info.start_time)
    assert newest.info.run_id == saved["run_id"] and newest.info.status == "FINISHED"
    assert len(client.get_metric_history(newest.info.run_id, "val_loss")) == EPOCHS
    # The refused second training left their shared parent run to the first, which ended it.
    parent = client.get_run(newest.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["deepopt.role"] == "experiment"
    assert parent.info.status == "FINISHED"


# The stage of the tiny pipeline: says it started, then waits for the test's go.
_STAGE = (
    "python -c \"import pathlib, time; pathlib.Path('started').touch(); "
    "[time.sleep(0.1) for _ in range(600) if not pathlib.Path('go').exists()]; "
    "pathlib.Path('out.txt').write_text('done')\""
)


def _dvc(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DVC, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )


def test_a_second_dvc_repro_is_refused_by_dvcs_lock_and_the_first_finishes_clean(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text(
        f"stages:\n  slow:\n    cmd: {_STAGE}\n    outs:\n      - out.txt\n", encoding="utf-8"
    )
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert _dvc("init", "-q", cwd=project).returncode == 0
    env = {**_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.Popen(
        [DVC, "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not (project / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (project / "started").exists(), "the first dvc repro did not start its stage"
        second = _dvc("repro", cwd=project)
        (project / "go").touch()
        output, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    # While the first runs a stage, DVC holds a lock on its outputs (.dvc/tmp/rwlock); around
    # that, the repository lock (.dvc/tmp/lock: "Unable to acquire lock"). Either refuses.
    assert second.returncode != 0
    assert "ERROR: failed to reproduce 'slow'" in second.stderr, second.stderr
    assert f"is busy, it is being blocked by:\n  (PID {first.pid}): " in second.stderr
    assert first.returncode == 0, output
    assert (project / "out.txt").read_text() == "done"
    status = _dvc("status", cwd=project)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout
    again = _dvc("repro", cwd=project)  # the lock is free again and nothing is left to run
    assert again.returncode == 0 and "didn't change" in again.stdout, again.stdout
