"""Faults beyond bad input, with real processes and real signals: a stage killed while it
writes, concurrent writers into one MLflow store, loaders that could run code, servers that
must bind to localhost. (Crafted files that would run code on load are in the bad-input
corpus, tests/system/test_bad_input.py.)"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from deepopt import cli, interrupts, tracking, tuning
from deepopt.config import TuneConfig, load_params, resolve_experiment
from deepopt.data import load_prepared
from deepopt.training.member import normalized_splits, train_tracked
from deepopt.training.seeds import Member
from deepopt.tuning import trials

REPO = Path(__file__).resolve().parents[2]
DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow changes its sqlite sessions under pytest
    return env


# ---------------------------------------------------------------------------------------
# Killed while writing: every output is whole or absent

# Runs `deepopt <argv>` in the current folder and SIGKILLs it halfway through the first
# write() into the KILL_AT-th file it opens for writing inside that folder: half of the
# bytes are on disk when it dies. Any writer, atomic or not, goes through open().
_KILL_WHILE_WRITING = r"""
import builtins, io, os, signal, sys

kill_at, workspace = int(sys.argv[1]), os.path.realpath(os.getcwd()) + os.sep
opened = 0
real_open = io.open


class DiesWhileWriting:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


def open_counting_writes(file, mode="r", *args, **kwargs):
    global opened
    handle = real_open(file, mode, *args, **kwargs)
    inside = isinstance(file, (str, os.PathLike)) and os.path.realpath(file).startswith(workspace)
    if inside and any(flag in mode for flag in "wax+"):
        opened += 1
        if opened == kill_at:
            return DiesWhileWriting(handle)
    return handle


builtins.open = io.open = open_counting_writes
from deepopt.cli import main

sys.exit(main(sys.argv[2:]))
"""

TRAIN_OUTPUTS = (
    "models/small/model.pt",
    "models/small/run.json",
    "metrics/small/train.json",
    "plots/small/history.csv",
)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # stage: (argv, the outputs it writes in this order)
    "prepare": (
        ("prepare",),
        tuple(f"data/prepared/{name}" for name in ("train.pt", "val.pt", "test.pt", "meta.json")),
    ),
    # After deleting the checkpoints train writes 3 epoch checkpoints and a final one first.
    "train": (("train", "--experiment", "small"), TRAIN_OUTPUTS),
    "evaluate": (
        ("evaluate", "--experiment", "small"),
        ("metrics/small/eval.json", "plots/small/confusion.png", "plots/small/misclassified.png"),
    ),
    "report": (("report",), ("reports/val_loss.png", "reports/lr.png", "reports/lecture.md")),
}


def _whole(data: bytes, reference: bytes) -> bool:
    """``data`` is the complete file: the reference bytes, or (for outputs holding wall
    times or run ids) a complete JSON object with its keys, or all CSV rows with all cells."""
    if data == reference:
        return True
    if not data.endswith(b"\n"):
        return False
    text, expected = data.decode(), reference.decode()
    if reference.startswith(b"{"):
        try:
            return set(json.loads(text)) == set(json.loads(expected))
        except json.JSONDecodeError:
            return False
    rows, expected_rows = text.splitlines(), expected.splitlines()
    width = len(expected_rows[0].split(","))
    return len(rows) == len(expected_rows) and all(len(r.split(",")) == width for r in rows)


def _history_without_seconds(work: Path) -> list[str]:
    lines = (work / "plots" / "small" / "history.csv").read_text().splitlines()
    seconds = lines[0].split(",").index("seconds")
    return [",".join(c for i, c in enumerate(line.split(",")) if i != seconds) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "kill_at"),
    [
        ("prepare", 1),  # train.pt
        ("prepare", 4),  # meta.json
        ("train", 2),  # epoch 2's checkpoint
        ("train", 7),  # train.json
        ("evaluate", 1),  # eval.json
        ("report", 3),  # lecture.md
    ],
)
def test_a_stage_killed_while_writing_leaves_each_output_whole_or_absent(
    finished: Path, stage: str, kill_at: int
) -> None:
    argv, outputs = STAGES[stage]
    if stage == "train":
        shutil.rmtree(finished / "checkpoints")  # train from scratch, checkpointing each epoch
    reference = {name: (finished / name).read_bytes() for name in outputs}
    history = _history_without_seconds(finished)

    done = subprocess.run(
        [sys.executable, "-c", _KILL_WHILE_WRITING, str(kill_at), *argv],
        cwd=finished,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == -9, done.stderr[-2000:]  # died inside its kill_at-th write

    leftovers = []
    for path in sorted(p for p in finished.rglob("*") if p.is_file()):
        name = str(path.relative_to(finished))
        if re.fullmatch(r"\..+\.tmp", path.name):
            leftovers.append(path)  # the half-written temp file (.dvcignore'd, see below)
        elif name in reference:
            assert _whole(path.read_bytes(), reference[name]), f"{name} is half-written"
        elif name.startswith("checkpoints/") and path.suffix == ".pt":  # not deepopt.lock
            saved = torch.load(path, weights_only=True)  # whole: loads, and holds an epoch
            assert saved["loop"]["epochs_done"] >= 1
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0

    assert cli.main(list(argv)) == 0  # the next run finishes with the complete outputs
    for name, content in reference.items():
        assert _whole((finished / name).read_bytes(), content), name
    assert _history_without_seconds(finished) == history  # resumed: the same metrics


def test_temp_files_of_the_atomic_writers_are_ignored_by_dvc() -> None:
    temp_files = ["reports/.lecture.md.k2j3h4.tmp", "metrics/small/.eval.json.x8c1q0.tmp"]
    done = subprocess.run(
        [DVC, "check-ignore", *temp_files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.split() == temp_files, done.stderr
    outputs = subprocess.run(
        [DVC, "check-ignore", "reports/lecture.md", "metrics/small/eval.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outputs.returncode == 1  # the outputs themselves are not ignored


# ---------------------------------------------------------------------------------------
# Concurrent writers into one sqlite MLflow store


def _metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# Seconds: a killed trial is failed 2 s after its last heartbeat.
TINY_TUNE = {"pruner": "none", "startup_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 2}


def _mlflow_runs(client: MlflowClient, name: str = "deepopt") -> list[Any]:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


def _assert_every_epoch_logged(client: MlflowClient, run: Any, epochs: int) -> None:
    for key in ("loss", "acc", "val_loss", "val_acc", "lr", "seconds"):
        steps = [step for step, _ in _metric_history(client, run.info.run_id, key)]
        assert steps == list(range(epochs)), (run.info.run_name, key, steps)


@pytest.mark.slow
def test_two_trainings_and_a_two_worker_tune_at_once_record_every_run_and_metric(
    workspace: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"  # does not exist yet: all create its schema at once
    work = workspace(
        experiments={"first": {}, "second": {"optim": {"lr": 0.03}}},
        tune={**TINY_TUNE, "workers": 2, "n_trials": 2, "epochs": 3},
    )
    env = {**_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    commands = {
        "first": ["train", "--experiment", "first"],
        "second": ["train", "--experiment", "second"],
        "tune": ["tune"],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "deepopt.cli", *command],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in commands.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {stderr[-2000:]}"

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    assert [e.name for e in client.search_experiments()].count("deepopt") == 1
    runs = _mlflow_runs(client)
    assert all(run.info.status == "FINISHED" for run in runs)
    seed_runs = [r for r in runs if r.data.tags.get("deepopt.role") == "seed"]
    trainings = {r.data.tags["experiment"]: r for r in seed_runs}
    assert sorted(trainings) == ["first", "second"] and len(seed_runs) == 2
    assert {r.info.run_name for r in seed_runs} == {"first seed 4487", "second seed 4487"}
    parents = [r for r in runs if r.data.tags.get("deepopt.role") == "experiment"]
    assert sorted(r.info.run_name for r in parents) == ["first", "second"]
    for name, run in trainings.items():
        assert run.data.params["optim.lr"] == ("0.02" if name == "first" else "0.03")
        lines = (work / "plots" / name / "history.csv").read_text().splitlines()
        header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
        assert len(rows) == 3
        for column, key in enumerate(header):
            if key != "epoch":  # every value of every epoch, as the CSV has it
                expected = [(int(row[0]), float(row[column])) for row in rows]
                assert _metric_history(client, run.info.run_id, key) == expected, (name, key)
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    assert sorted(r.data.tags["optuna_trial"] for r in trials) == ["0", "1"]
    for run in trials:
        assert run.data.tags["trial_state"] == "COMPLETE"
        _assert_every_epoch_logged(client, run, epochs=3)
    sessions = [r for r in runs if r.data.tags.get("tune_session") == "main"]
    assert len(sessions) == 1 and sessions[0].data.metrics["trials_complete"] == 2
    models = client.search_logged_models(experiment_ids=[runs[0].info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(
        r.info.run_id for r in trainings.values()
    )


# ---------------------------------------------------------------------------------------
# Interrupting a study


def _study(work: Path) -> optuna.Study:
    storage = f"sqlite:///{work / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_sigterm_during_a_two_worker_study_loses_and_redoes_no_finished_trial(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(tune={**TINY_TUNE, "workers": 2, "n_trials": 4, "epochs": 6})
    process = subprocess.Popen(
        [sys.executable, "-m", "deepopt.cli", "tune"],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline, finished_one = time.monotonic() + 300, False
    for line in process.stderr:  # until a trial has finished and a later one is under way
        finished_one = finished_one or "epoch 6/6" in line
        if finished_one and re.search(r"\[trial-[2-9] seed \d+\] epoch 2/6", line):
            break
        assert time.monotonic() < deadline, "the study made no progress"
    rest: list[str] = []  # keep reading: a full pipe would block the writers
    reader = threading.Thread(target=lambda: rest.extend(process.stderr or ()), daemon=True)
    reader.start()
    process.send_signal(signal.SIGTERM)
    try:
        # Generous: on 2 busy cores the workers may wait for sqlite locks while stopping.
        code = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("tune did not stop: " + "".join(rest)[-3000:]) from None
    reader.join(timeout=30)
    assert code == 130, "".join(rest)[-3000:]
    assert "Traceback" not in "".join(rest)

    study = _study(work)
    complete = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    interrupted = study.get_trials(states=(TrialState.FAIL,))
    assert complete and interrupted and not study.get_trials(states=(TrialState.RUNNING,))
    client = MlflowClient()
    runs = _mlflow_runs(client)
    assert "RUNNING" not in {run.info.status for run in runs}
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in runs if "optuna_trial" in r.data.tags}
    for trial in interrupted:  # (one interrupted before its run began has none)
        run = by_trial.get(trial.number)
        assert run is None or run.info.status == "KILLED", (run.data.tags, trial.user_attrs)
    assert {r.info.status for r in runs if r.data.tags.get("tune_session")} == {"KILLED"}
    finished_runs = {n: by_trial[n].info.end_time for n in complete}

    assert cli.main(["tune"]) == 0
    capsys.readouterr()
    study = _study(work)
    now_complete = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(now_complete) == 4  # exactly n_trials: nothing redone, nothing lost
    for number, trial in complete.items():  # the same trials, values and runs as before
        assert now_complete[number].value == trial.value
        assert now_complete[number].datetime_complete == trial.datetime_complete
    runs = _mlflow_runs(client)
    trial_runs = [r for r in runs if "optuna_trial" in r.data.tags]
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in trial_runs}
    assert len(by_trial) == len(trial_runs)  # no trial has two runs
    assert set(now_complete) <= set(by_trial)
    assert {n: by_trial[n].info.end_time for n in complete} == finished_runs
    # Each retry continued where its trial was interrupted: at most the epoch then under
    # way is trained again (its reported epochs were all checkpointed before).
    assert len(study.trials) == 4 + len(interrupted)  # each interrupted one ran once more
    retries = [t for t in now_complete.values() if t.user_attrs.get("retry_of") is not None]
    reported = {t.number: len(t.intermediate_values) for t in interrupted}
    for retry in retries:
        assert retry.user_attrs["continued_from_epoch"] >= reported[retry.user_attrs["retry_of"]]
    assert max(reported.values()) >= 1  # the trial the signal was timed for had epochs done
    for trial in now_complete.values():
        _assert_every_epoch_logged(client, by_trial[trial.number], epochs=6)


def test_an_interrupt_after_a_trial_trained_waits_until_optuna_recorded_it(
    tmp_path: Path,
) -> None:
    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", TuneConfig())
    study = optuna.create_study(study_name="held", storage=storage.storage)
    handler = signal.getsignal(signal.SIGINT)

    def objective(trial: optuna.Trial) -> float:
        trials._HELD.hold()  # what the objective does once train_tracked has returned
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C now, a real signal
        return trial.suggest_float("x", 0.0, 1.0)

    with pytest.raises(KeyboardInterrupt):
        tuning.run_trials(
            study, objective, n_trials=3, storage=storage, lock_path=tmp_path / "claim.lock"
        )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # recorded, then stopped
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_second_interrupt_while_optuna_records_an_interrupted_trial_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C stops a trial; a SIGTERM (a scheduler, dvc) comes while Optuna's tell() writes
    # the FAIL: it used to cut that write in half, Optuna then printed its UnboundLocalError
    # traceback and left the trial RUNNING.
    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", TuneConfig())
    study = optuna.create_study(study_name="twice", storage=storage.storage)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    recording = study._storage.set_trial_state_values
    second: list[int] = []

    def set_state_then_signal(trial_id: int, state: TrialState, values: Any = None) -> bool:
        if state == TrialState.FAIL and not second:
            second.append(trial_id)
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, inside Optuna's tell
        return bool(recording(trial_id, state, values))

    monkeypatch.setattr(study._storage, "set_trial_state_values", set_state_then_signal)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        os.kill(os.getpid(), signal.SIGINT)  # the first: stops the trial
        return 0.0

    with interrupts.handling_interrupts(), pytest.raises(KeyboardInterrupt):
        tuning.run_trials(
            study, objective, n_trials=3, storage=storage, lock_path=tmp_path / "claim.lock"
        )
    assert second  # the second signal came during the tell
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # recorded whole
    assert not trials._HELD.held
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


class _InterruptWhileAsking(optuna.samplers.RandomSampler):
    """Ctrl-C inside Optuna's ask(), right after it stored the new trial (before_trial runs
    then): the window in which an interrupt used to leave the trial RUNNING."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupt_while_optuna_creates_a_trial_fails_and_requeues_it(tmp_path: Path) -> None:
    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", TuneConfig())
    study = optuna.create_study(
        study_name="asking", storage=storage.storage, sampler=_InterruptWhileAsking(seed=0)
    )
    handler = signal.getsignal(signal.SIGINT)
    trained: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        trained.append(trial.number)
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        tuning.run_trials(
            study, objective, n_trials=3, storage=storage, lock_path=tmp_path / "claim.lock"
        )
    assert trained == []  # stopped before the objective ran
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.slow
def test_a_trial_retry_continues_a_finished_checkpoint_without_training_again(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A trial whose process died after training, before Optuna recorded it: its retry
    # adopts the finished checkpoint and only records the run.
    config = resolve_experiment(load_params(finished / "params.yaml"), "small")
    data = load_prepared(config.data, config.seed)
    (saved,) = (finished / "checkpoints" / "small").glob("*.pt")
    history = torch.load(saved, weights_only=True)["loop"]["history"]
    retry = finished / "checkpoints" / "retry"
    assert trials._adopt_checkpoint(saved.parent, retry, config, data.meta["digest"]) == 3

    tracking.configure()
    result = train_tracked(
        config,
        normalized_splits(data),
        data_meta=data.meta,
        experiment_id=tracking.ensure_experiment(config.mlflow.experiment),
        run_name="trial-retry",
        member=Member(replica=0, index=0, seed=config.seed),
        checkpoint_dir=retry,
    )
    assert result.fit.history == history and result.fit.epochs_run == 3
    assert "epoch 1/3" not in capsys.readouterr().err  # no epoch trained again
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-retry"
    _assert_every_epoch_logged(MlflowClient(), run, epochs=3)  # its own, complete run


# ---------------------------------------------------------------------------------------
# Files that could run code, and servers


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [(ast.unparse(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_loader_can_run_code_from_a_file() -> None:
    """One torch.load in the whole package (files.load_torch), with weights_only=True; no
    eval/exec, pickle, marshal, yaml.load anywhere, subpackages included."""
    forbidden = {"eval", "exec", "compile", "__import__", "yaml.load", "yaml.unsafe_load"}
    forbidden |= {f"{m}.{f}" for m in ("pickle", "marshal", "dill") for f in ("load", "loads")}
    package = REPO / "src" / "deepopt"
    sources = sorted(package.rglob("*.py"))
    assert any(path.parent != package for path in sources)  # the subpackages are scanned
    loads = []
    for source in sources:
        for name, call in _calls(ast.parse(source.read_text(encoding="utf-8"))):
            where = f"{source.relative_to(package)}:{call.lineno}"
            assert name not in forbidden and "Unpickler" not in name, f"{where}: {name}"
            if name == "torch.load":
                loads.append(where)
                safe = [k for k in call.keywords if k.arg == "weights_only"]
                assert safe and ast.literal_eval(safe[0].value) is True, where
            if name.endswith(("np.load", "numpy.load")):
                assert not any(k.arg == "allow_pickle" for k in call.keywords), where
    assert [where.split(":")[0] for where in loads] == ["files.py"], loads


SERVER = r"mlflow (ui|server)|optuna-dashboard"  # commands that listen on a port


def _server_targets(makefile: str) -> list[str]:
    """Makefile targets whose recipe starts a server (mlflow ui/server, optuna-dashboard)."""
    targets, current = [], None
    for line in makefile.splitlines():
        rule = re.match(r"^([A-Za-z][\w-]*):", line)
        if rule:
            current = rule.group(1)
        elif (
            line.startswith("\t")
            and current
            and re.search(r"mlflow (ui|server)|optuna-dashboard", line)
        ):
            targets.append(current)
    return sorted(set(targets))


def test_every_server_the_makefile_starts_binds_to_localhost() -> None:
    targets = _server_targets((REPO / "Makefile").read_text(encoding="utf-8"))
    assert "ui" in targets
    for target in targets:
        done = subprocess.run(
            ["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
        )
        commands = done.stdout.replace("\\\n", " ").splitlines()  # join continued lines
        servers = [line for line in commands if re.search(SERVER, line)]
        assert servers, target
        for line in servers:
            assert re.search(r"--host[= ]127\.0\.0\.1(\s|$)", line), f"make {target}: {line}"
