"""Optuna on a real PostgreSQL server with workers on "several machines": each worker runs
in its own folder (its own params, prepared data, checkpoints and lock files) and shares
only the database and an MLflow tracking server (itself on the same PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from deepopt import tuning
from deepopt.config import TuneConfig
from services import Postgres, mlflow_server, postgres_server

pytestmark = pytest.mark.slow

N_TRIALS = 6
MACHINES = 3
TIMEOUT_S = 480


@pytest.fixture(scope="module")
def database() -> Iterator[Postgres]:
    """One PostgreSQL server for this module; each test creates its own databases."""
    with postgres_server() as server:
        yield server


def test_workers_opening_a_new_database_at_once_all_get_the_storage(database: Postgres) -> None:
    url = database.create_database("race")
    opened: list[object] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            opened.append(tuning.open_storage(url, TuneConfig()))
        except BaseException as err:  # reported below, with the others
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(opened) == 4, errors


def test_the_claim_lock_on_postgresql_holds_off_workers_of_other_machines(
    database: Postgres, tmp_path: Path
) -> None:
    url = database.create_database("claims")
    # Two machines: each its own engine and its own lock file; only the database is shared.
    here = tuning.claim_lock(tuning.open_storage(url, TuneConfig()), tmp_path / "a.lock", "s")
    there = tuning.claim_lock(tuning.open_storage(url, TuneConfig()), tmp_path / "b.lock", "s")
    events: list[str] = []

    def claim_there() -> None:
        with there:
            events.append("there claims")

    with here:
        waiting = threading.Thread(target=claim_there)
        waiting.start()
        time.sleep(1.0)  # ample time to claim, were it not locked out
        events.append("here releases")
    waiting.join(timeout=30)
    assert events == ["here releases", "there claims"]


def _deepopt(machine: Path, tracking_uri: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deepopt", "tune", *args],
        cwd=machine,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"},
    )


def _finish(process: subprocess.Popen[str]) -> dict[str, object]:
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}:\n{err[-3000:]}"
    summary: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return summary


def test_workers_on_three_machines_finish_exactly_n_trials_all_in_mlflow(
    database: Postgres, workspace: Callable[..., Path], tmp_path: Path
) -> None:
    storage = database.create_database("optuna")
    tracking_store = database.create_database("mlflow")
    with mlflow_server(tmp_path / "mlflow", backend=tracking_store) as server:
        settings = {
            "workers": 1,
            "epochs": 3,
            "n_trials": N_TRIALS,
            "pruner": "none",
            "startup_trials": 2,
            "heartbeat_interval": 1,
            "heartbeat_grace": 3,
        }
        # Machine 0 names the storage in params.yaml, the others on the command line.
        work = workspace(tune={**settings, "storage": storage}, mlflow={"log_model": False})
        machines = [tmp_path / f"machine{i}" for i in range(MACHINES)]
        for machine in machines:
            shutil.copytree(work, machine)
        workspace(tune=settings, mlflow={"log_model": False})
        for machine in machines[1:]:
            shutil.copy2(work / "params.yaml", machine / "params.yaml")

        # All at once on an empty database: they race to create Optuna's tables too.
        workers = [_deepopt(machines[0], server.uri, "--worker")] + [
            _deepopt(machine, server.uri, "--worker", "--storage", storage)
            for machine in machines[1:]
        ]
        summaries = [_finish(process) for process in workers]
        # The main session: nothing left to run; it writes the best trial's overrides.
        final = _finish(_deepopt(machines[0], server.uri))

        (name,) = {summary["study"] for summary in summaries}
        study = optuna.load_study(study_name=str(name), storage=storage)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * N_TRIALS
        assert sorted(t.number for t in study.trials) == list(range(N_TRIALS))
        ran = [int(str(summary["trials_this_session"])) for summary in summaries]
        assert sum(ran) == N_TRIALS and sum(n > 0 for n in ran) >= 2, ran
        assert final["trials_this_session"] == 0 and final["best_trial"] in range(N_TRIALS)
        assert (machines[0] / "params" / "best.yaml").is_file()

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("deepopt")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        sessions = {r.info.run_id for r in runs if r.data.tags.get("tune_session")}
        trials = [r for r in runs if "optuna_trial" in r.data.tags]
        assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == list(
            range(N_TRIALS)
        )  # one run per trial
        for run in trials:
            assert run.info.status == "FINISHED"
            assert run.data.tags[tuning.STATE_TAG] == "COMPLETE"
            assert run.data.tags["mlflow.parentRunId"] in sessions
        best = next(r for r in trials if r.data.tags["optuna_trial"] == str(final["best_trial"]))
        steps = [m.step for m in client.get_metric_history(best.info.run_id, "val_loss")]
        assert sorted(steps) == [0, 1, 2]
