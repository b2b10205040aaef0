"""The tune stage: the space and its errors, pruning, studies run, killed, resumed and shared."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from optuna.trial import TrialState

from deepopt import cli, tuning
from deepopt.config import (
    OPTIMIZER_KNOBS,
    EarlyStopConfig,
    RunConfig,
    TuneConfig,
    TuneSpace,
    apply_overrides,
    load_overrides,
    load_params,
    parse_params,
)
from deepopt.errors import ConfigError
from deepopt.training import LoopState

# Seconds: a killed trial is failed 2 s after its last heartbeat, so tests wait little.
FAST_HEARTBEAT = {"heartbeat_interval": 1, "heartbeat_grace": 2}


def _tune_params(**tune_settings: Any) -> dict[str, Any]:
    """tune settings for the tiny workspace: one worker, no pruning, a small space."""
    return {
        "workers": 1,
        "epochs": 3,
        "n_trials": 3,
        "pruner": "none",
        "startup_trials": 2,
        **FAST_HEARTBEAT,
        **tune_settings,
    }


def _study(work: Path, name: str | None = None, storage: str = "sqlite:///optuna.db") -> Any:
    if storage.startswith("journal:///"):
        path = storage.removeprefix("journal:///")
        backend = optuna.storages.journal.JournalFileBackend(str(work / path))
        store: Any = optuna.storages.JournalStorage(backend)
    else:
        store = f"sqlite:///{work / storage.removeprefix('sqlite:///')}"
    names = optuna.get_all_study_names(store)
    return optuna.load_study(study_name=name or names[-1], storage=store)


def _runs(work: Path) -> list[Run]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


def _trial_runs(work: Path, study: str) -> dict[int, Run]:
    runs = [r for r in _runs(work) if r.data.tags.get("optuna_study") == study]
    children = [r for r in runs if "optuna_trial" in r.data.tags]
    by_number = {int(r.data.tags["optuna_trial"]): r for r in children}
    assert len(by_number) == len(children), "two MLflow runs for one trial"
    return by_number


def _tune(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> dict[str, Any]:
    assert cli.main(["tune", *args]) == code
    out = capsys.readouterr().out
    return json.loads(out) if code == 0 else {}


def _assert_runs_match_trials(work: Path, study: Any) -> None:
    """One MLflow child run per trial, tagged with the trial's final state."""
    runs = _trial_runs(work, study.study_name)
    trials = study.get_trials()
    assert sorted(runs) == sorted(t.number for t in trials)
    for trial in trials:
        run = runs[trial.number]
        assert run.data.tags[tuning.STATE_TAG] == trial.state.name
        assert run.info.status != "RUNNING"
        assert "mlflow.parentRunId" in run.data.tags


# ---------------------------------------------------------------------------------------
# The space and the configs of trials (no training)


def _error(tmp_path: Path, base_params: dict[str, Any], tune_section: dict[str, Any]) -> str:
    params = {**base_params, "tune": tune_section}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"space": {"lr": {"low": 0.1, "high": 0.01}}},
            "tune.space.lr: low 0.1 must be < high 0.01",
        ),
        (
            {"space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}},
            "tune.space.lr: a log range needs low > 0, got low 0",
        ),
        (
            {"space": {"momentum": {"low": 0.5, "high": 1.5}}},
            "tune.space.momentum: high 1.5 is not a valid optim.momentum",
        ),
        (
            {"space": {"schedule": {"plateau": {"factor": {"low": 0.5, "high": 0.2}}}}},
            "tune.space.schedule.plateau.factor: low 0.5 must be < high 0.2",
        ),
        (
            {"space": {"schedule": {"plateau": {"patience": {"low": 0.5, "high": 3}}}}},
            "tune.space.schedule.plateau.patience: low 0.5 must be a whole number",
        ),
        (
            {"space": {"schedule": {"linear": {"factor": {"low": 0.1, "high": 0.5}}}}},
            "tune.space.schedule.linear.factor: not a searchable knob of schedule 'linear'",
        ),
        (
            {"space": {"schedule": {"cosin": {}}}},
            "tune.space.schedule.cosin: unknown schedule (did you mean 'cosine'?)",
        ),
        (
            {"space": {"optimizer": ["adam", "sgd"]}},
            "tune.space.nesterov: set it to false when tune.space.optimizer is searched",
        ),
        ({"n_trials": 0}, "tune.n_trials: 0 is out of range"),
        ({"experiment": "nope"}, "tune.experiment: 'nope' is not in experiments"),
    ],
)
def test_bad_tune_settings_are_one_line_config_errors(
    tmp_path: Path, base_params: dict[str, Any], section: dict[str, Any], expected: str
) -> None:
    assert f"params.yaml: {expected}" in _error(tmp_path, base_params, section)


def test_unknown_storage_scheme_is_a_config_error_naming_the_allowed_ones(
    tmp_path: Path,
    base_params: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = _error(tmp_path, base_params, {"storage": "redis://localhost:6379"})
    assert "tune.storage: 'redis://localhost:6379' has an unknown scheme 'redis'" in message
    assert "sqlite, postgresql, mysql" in message and "journal" in message
    # The same check on the command line, before any data is read.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base_params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tune", "--storage", "mongodb://x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--storage: 'mongodb://x' has an unknown scheme" in err


def _files(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("bogus://x", "--storage: 'bogus://x' has an unknown scheme 'bogus'; allowed: sqlite, "),
        ("sqlite://optuna.db", "--storage: 'sqlite://optuna.db' names no file"),
        ("journal://optuna.log", "--storage: 'journal://optuna.log' names no file"),
    ],
)
def test_a_bad_storage_option_exits_2_in_one_line_before_anything_is_written(
    workspace: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    url: str,
    expected: str,
) -> None:
    work = workspace(tune=_tune_params())
    before = _files(tmp_path)
    assert cli.main(["tune", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    if "unknown scheme" in expected:
        assert "postgresql" in err and "journal" in err
    assert _files(tmp_path) == before  # no study, MLflow store, checkpoint or best.yaml
    assert not (work / "optuna.db").exists()


def test_optuna_logs_expected_failures_without_traceback_only_while_trials_run(
    tmp_path: Path,
) -> None:
    logger = logging.getLogger("optuna.study._optimize")
    filters = list(logger.filters)  # importing deepopt.tuning installs nothing
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", TuneConfig())
    study = optuna.create_study(study_name="quiet", storage=storage.storage)

    def objective(trial: optuna.Trial) -> float:
        raise ConfigError("expected, reported by the CLI in one line")

    handler = Keep()
    logger.addHandler(handler)
    try:
        with pytest.raises(ConfigError):
            tuning.run_trials(
                study, objective, n_trials=1, storage=storage, lock_path=tmp_path / "claim.lock"
            )
    finally:
        logger.removeHandler(handler)
    (failed,) = [r for r in records if "following error" in r.getMessage()]
    assert failed.exc_info is None
    assert logger.filters == filters  # removed again once the trials ran


def test_sampled_points_are_valid_configs_with_conditional_knobs() -> None:
    space = TuneSpace()
    settings = TuneConfig(epochs=4)
    base = RunConfig()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        overrides = tuning.sample_overrides(trial, space, base.optim.name)
        config = tuning.trial_config(base, overrides, settings)
        schedule = trial.params["schedule"]
        seen.add(schedule)
        knobs = {k.split(".", 1)[1] for k in trial.params if k.startswith(f"{schedule}.")}
        assert knobs == set(space.schedule[schedule]) if space.schedule else set()
        assert not any("." in k and not k.startswith(f"{schedule}.") for k in trial.params)
        assert config.schedule.name == schedule and config.train.epochs == 4
        assert config.optim.name in ("momentum", "nesterov")
        assert config.optim.lr == trial.params["lr"] and config.mlflow.log_model is False
        study.tell(trial, 0.0)
    assert seen == set(space.schedule or {})


def test_momentum_is_drawn_only_for_optimizers_that_take_it() -> None:
    space = TuneSpace(optimizer=["adam", "nesterov"], nesterov=False)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        overrides = tuning.sample_overrides(trial, space, "nesterov")
        takes = "momentum" in OPTIMIZER_KNOBS[trial.params["optimizer"]]
        assert ("momentum" in trial.params) == takes == ("momentum" in overrides["optim"])
        study.tell(trial, 0.0)


@pytest.mark.parametrize("final_fit", ["train", "train+val"])
def test_best_overrides_rebuild_the_trial_config_from_the_base(
    base_params: dict[str, Any], final_fit: str
) -> None:
    params = parse_params({**base_params, "tune": {"epochs": 7, "final_fit": final_fit}})
    base = params.base_run()
    sampled = {"optim": {"name": "momentum", "lr": 0.05, "momentum": 0.8}}
    sampled["schedule"] = {"name": "plateau", "factor": 0.3, "patience": 2}
    best = tuning.trial_config(base, sampled, params.tune)
    overrides = tuning.best_overrides(params, best, final_fit=final_fit, epochs_run=5)
    final = apply_overrides(base, overrides)
    assert final.optim == best.optim and final.schedule == best.schedule
    assert final.mlflow == base.mlflow and final.train.precision == base.train.precision
    if final_fit == "train":
        assert final == apply_overrides(best, {"mlflow": base.mlflow.model_dump()})
        assert overrides["train"] == {"epochs": 7}
    else:
        assert overrides["train"] == {"epochs": 5, "fit_on": "train+val"}
        assert overrides["early_stop"] == {"enabled": False}


def test_direction_and_value_follow_the_monitored_metric() -> None:
    history = [
        {"epoch": 0.0, "val_loss": 0.9, "val_acc": 0.6},
        {"epoch": 1.0, "val_loss": 0.5, "val_acc": 0.8},
        {"epoch": 2.0, "val_loss": 0.7, "val_acc": 0.7},
    ]
    assert tuning.direction(EarlyStopConfig(monitor="val_loss")) == "minimize"
    assert tuning.direction(EarlyStopConfig(monitor="val_acc")) == "maximize"
    assert tuning.objective_value(history, EarlyStopConfig(), best_epoch=1) == 0.7  # last epoch
    restore = EarlyStopConfig(monitor="val_acc", restore_best=True)
    assert tuning.objective_value(history, restore, best_epoch=1) == 0.8


def test_changed_space_or_data_names_a_new_study() -> None:
    start = RunConfig()
    name = tuning.derive_study_name("base", TuneSpace(), start, "digest-a")
    assert name == tuning.derive_study_name("base", TuneSpace(), start, "digest-a")
    narrower = TuneSpace(lr={"low": 0.01, "high": 0.1, "log": True})
    assert tuning.derive_study_name("base", narrower, start, "digest-a") != name
    assert tuning.derive_study_name("base", TuneSpace(), start, "digest-b") != name
    assert name.startswith("base-")


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruner_prunes_a_trial_that_falls_behind(pruner: str) -> None:
    # A rigged objective: the same training-loop callback the real trials use, fed
    # per-epoch validation losses; trials 0-5 converge, each a bit better, then one stays
    # at 2.0.
    settings = TuneConfig(pruner=pruner, epochs=9, pruner_startup_trials=3, pruner_warmup_epochs=1)
    # A fixed name: hyperband assigns trials to brackets by a hash of it.
    study = optuna.create_study(study_name="rigged", pruner=tuning.build_pruner(settings))
    reasons: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        bad = trial.number == 6
        hook = tuning.pruning_hook(trial, "val_loss", reasons.append)
        history: list[dict[str, float]] = []
        for epoch in range(settings.epochs):
            value = 2.0 if bad else 1.0 / (epoch + 1) - 0.001 * trial.number
            history.append({"epoch": float(epoch), "val_loss": value})
            hook(LoopState(epochs_done=epoch + 1, history=history))
        return history[-1]["val_loss"]

    study.optimize(objective, n_trials=7)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 6 + [TrialState.PRUNED]
    assert len(reasons) == states.count(TrialState.PRUNED)
    assert reasons[-1].startswith("pruned after epoch ") and "val_loss 2.0000" in reasons[-1]


def test_train_overrides_file_errors_name_the_file(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    (work / "best.yaml").write_text("optim:\n  lr: -1\n", encoding="utf-8")
    assert cli.main(["train", "--experiment", "x", "--overrides", "best.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.yaml: optim.lr: -1" in err
    assert cli.main(["train", "--overrides", "missing.yaml"]) == 2
    assert "missing.yaml: overrides file not found" in capsys.readouterr().err
    assert load_overrides(work / "best.yaml") == {"optim": {"lr": -1}}


def test_train_plus_val_fits_on_both_splits(workspace: Callable[..., Path]) -> None:
    from deepopt.data import load_prepared
    from deepopt.training.member import normalized_splits

    workspace()
    data = load_prepared(RunConfig().data.model_copy(update={"train_subset": 500}), 4487)
    both = normalized_splits(data, "train+val")
    only = normalized_splits(data)
    assert len(both["train"][0]) == len(only["train"][0]) + len(only["val"][0])
    assert torch.equal(both["val"][1], only["val"][1])
    assert torch.equal(both["train"][0][-len(only["val"][0]) :], only["val"][0])


# ---------------------------------------------------------------------------------------
# Studies end to end on tiny data


@pytest.mark.slow
def test_tiny_study_writes_best_yaml_and_train_best_reproduces_the_best_trial(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(tune=_tune_params())
    summary = _tune(capsys)
    study = _study(work, summary["study"])
    assert summary["trials"] == {"COMPLETE": 3} and summary["trials_this_session"] == 3
    best = study.best_trial
    assert summary["best_trial"] == best.number and summary["best_value"] == best.value
    overrides = load_overrides(work / "params" / "best.yaml")
    assert overrides == summary["overrides"] and overrides["optim"]["lr"] == best.params["lr"]

    runs = _runs(work)
    (parent,) = [r for r in runs if r.data.tags.get("tune_session") == "main"]
    _assert_runs_match_trials(work, study)
    children = _trial_runs(work, study.study_name).values()
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.data.metrics["best_value"] == best.value
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "optimization_history.png", "parallel_coordinate.png"} <= artifacts
    assert not (work / "checkpoints" / "tune" / study.study_name / f"trial-{best.number}").exists()

    # Running it again continues the same study: nothing is missing, nothing runs.
    again = _tune(capsys)
    assert again["study"] == summary["study"] and again["trials_this_session"] == 0

    # The final fit with final_fit=train is the best trial itself, under its own name.
    assert cli.main(["train", "--experiment", "train_best", "--overrides", "params/best.yaml"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["experiment"] == "train_best"
    assert trained["final_val_loss"] == pytest.approx(best.value, rel=1e-5)
    for output in ("models/train_best/model.pt", "metrics/train_best/train.json"):
        assert (work / output).is_file()
    assert (work / "plots" / "train_best" / "history.csv").is_file()


@pytest.mark.slow
def test_changed_space_starts_a_new_study_and_more_trials_extend_one(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    space: dict[str, Any] = {"schedule": None}
    work = workspace(tune=_tune_params(n_trials=1, epochs=1, space=space))
    first = _tune(capsys)
    extended = _tune(capsys, "--n-trials", "2")
    assert extended["study"] == first["study"] and extended["trials_this_session"] == 1
    space["lr"] = {"low": 0.01, "high": 0.05}
    workspace(tune=_tune_params(n_trials=1, epochs=1, space=space))
    changed = _tune(capsys)
    assert changed["study"] != first["study"] and changed["trials"] == {"COMPLETE": 1}
    assert len(optuna.get_all_study_names(f"sqlite:///{work / 'optuna.db'}")) == 2


@pytest.mark.slow
def test_diverging_trials_are_pruned_with_their_reason_and_the_study_carries_on(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    space = {"lr": {"low": 3.0, "high": 8.0, "log": True}, "schedule": None}  # optim.lr <= 10
    work = workspace(model={"batchnorm": False}, tune=_tune_params(n_trials=2, space=space))
    assert cli.main(["tune"]) == 1  # no trial completed: no best.yaml
    err = capsys.readouterr().err
    assert "has no complete trial" in err and "params/best.yaml not written" in err
    study = _study(work)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        assert trial.user_attrs["reason"].startswith("diverged: ")
    _assert_runs_match_trials(work, study)
    assert not (work / "params" / "best.yaml").exists()


def _spawn(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deepopt.cli", "tune"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(process: subprocess.Popen[str], marker: str) -> None:
    """Read the progress lines until one contains ``marker``."""
    assert process.stderr is not None
    deadline = time.monotonic() + 180
    for line in process.stderr:
        if marker in line:
            return
        assert time.monotonic() < deadline, f"no '{marker}' in time"
    raise AssertionError(f"process ended before '{marker}': exit {process.wait()}")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:///optuna.db", "journal:///optuna.log"])
def test_killed_study_resumes_to_exactly_n_trials_with_the_stale_trial_failed(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str], storage: str
) -> None:
    work = workspace(tune=_tune_params(epochs=6, storage=storage))
    process = _spawn(work)
    _wait_for(process, "[trial-1 seed 4487] epoch 2/6")  # trial 1 has 2 epochs checkpointed
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert _study(work, storage=storage).trials[1].state == TrialState.RUNNING

    summary = _tune(capsys)
    study = _study(work, summary["study"], storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    assert states[1] == TrialState.FAIL and len(states) == 4
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[1].params
    assert retry.user_attrs["continued_from_epoch"] >= 2  # from the dead trial's checkpoint
    _assert_runs_match_trials(work, study)
    runs = _trial_runs(work, study.study_name)
    assert runs[1].info.status == "FAILED"
    steps = MlflowClient().get_metric_history(runs[retry.number].info.run_id, "val_loss")
    assert sorted(m.step for m in steps) == list(range(6))  # earlier epochs logged again


@pytest.mark.slow
def test_ctrl_c_fails_the_current_trial_exits_130_and_the_study_resumes(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(tune=_tune_params(epochs=6, n_trials=2))
    process = _spawn(work)
    _wait_for(process, "[trial-0 seed 4487] epoch 2/6")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert process.stderr is not None and "Traceback" not in process.stderr.read()
    study = _study(work)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs["reason"].startswith("interrupted")

    summary = _tune(capsys)
    assert summary["trials"] == {"COMPLETE": 2, "FAIL": 1}
    _assert_runs_match_trials(work, _study(work, summary["study"]))


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:///optuna.db"])
def test_two_workers_finish_exactly_n_trials(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str], storage: str
) -> None:
    settings = _tune_params(workers=2, n_trials=6, storage=storage, epochs=3)
    work = workspace(tune=settings)
    summary = _tune(capsys)
    study = _study(work, summary["study"], storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    _assert_runs_match_trials(work, study)
    runs = _trial_runs(work, study.study_name).values()
    assert {r.data.tags["tune_worker"] for r in runs} == {"0", "1"}  # both took trials
    assert summary["trials_this_session"] == 6


@pytest.mark.slow
def test_workers_stop_when_their_session_is_killed_and_the_study_resumes(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(tune=_tune_params(workers=2, n_trials=4, epochs=6))
    process = _spawn(work)
    _wait_for(process, "epoch 2/6")
    process.send_signal(signal.SIGKILL)  # the session only: its workers see it gone
    assert process.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while _study(work).get_trials(states=(TrialState.RUNNING,)):
        assert time.monotonic() < deadline, "workers kept running without their session"
        time.sleep(0.5)
    interrupted = _study(work).get_trials(states=(TrialState.FAIL,))
    assert interrupted and all("session" in t.user_attrs["reason"] for t in interrupted)

    workspace(tune=_tune_params(workers=1, n_trials=4, epochs=6))  # resumed by one process
    summary = _tune(capsys)
    study = _study(work, summary["study"])
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4 and summary["trials"]["FAIL"] == len(interrupted)
    _assert_runs_match_trials(work, study)
