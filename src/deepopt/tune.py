"""The ``tune`` stage: an Optuna study over ``tune.space``; its best trial -> params/best.yaml.

A trial is the base run config (or ``tune.experiment``'s) with the sampled values applied
through the config's own override machinery, trained for ``tune.epochs`` by
``train.train_tracked``, the one code path that trains a network: the objective here only
samples, reports the monitored validation metric every epoch to the pruner and returns it.

Study. A seeded TPE sampler (one seed per session and worker, so a resumed session does not
redraw the first session's random trials), the median or hyperband pruner, the direction of
``early_stop.monitor``. Its name is the experiment plus a hash of the space, the trials'
config and the prepared data: a changed space starts a new study, an unchanged one resumes.

Trial count. ``tune.n_trials`` is the number of finished (complete + pruned) trials the
study should hold. Before each trial a worker counts finished and running trials under a
lock file that the workers of this machine share (on PostgreSQL, an advisory lock in the
database that the workers of every machine share); Optuna's MaxTrialsCallback counts only
after a trial ends, so N parallel workers would overshoot by up to N - 1 trials.

Crash safety. SQL storages get Optuna's heartbeat: a trial whose process died is failed after
``tune.heartbeat_grace`` seconds and queued again (RetryHeartbeatStaleTrialCallback) with its
params and reported values; the journal file storage has no heartbeat, so a session failing
and requeueing every RUNNING trial when it starts (it has started no workers yet; do not run
two sessions at once on a journal file). An interrupted trial (Ctrl-C, SIGTERM) is failed and
queued again the same way. A queued retry continues the dead trial's last checkpoint under
its own trial number, checkpoint folder and MLflow run (whose history gets the earlier epochs
logged again), so each trial has exactly one MLflow child run. A diverging trial (NaN loss)
is recorded as pruned (TPE then treats its region as bad; failed trials it ignores) with
the reason in the user attr ``reason``.

MLflow. One parent run per session, one child run per trial (tags ``optuna_study``,
``optuna_trial``, ``trial_state`` = RUNNING, then COMPLETE / PRUNED / FAIL); the parent logs
the best value and params, params/best.yaml and Optuna's plots.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import optuna
import torch
import yaml
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from deepopt import interrupts, paths, tracking
from deepopt.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from deepopt.config import (
    OPTIMIZER_KNOBS,
    EarlyStopConfig,
    Params,
    RunConfig,
    ScheduleConfig,
    SearchRange,
    TuneConfig,
    TuneSpace,
    apply_overrides,
    check_storage_url,
    resolve_experiment,
)
from deepopt.data import load_prepared
from deepopt.errors import EXIT_INTERRUPTED, ConfigError, DataError, DeepoptError, DivergedError
from deepopt.files import check_writable, write_text
from deepopt.train import BASE_EXPERIMENT, Member, split_tensors, train_tracked
from deepopt.training import LoopState

__all__ = [
    "BEST_PARAMS",
    "STATE_TAG",
    "best_overrides",
    "config_overrides",
    "derive_study_name",
    "direction",
    "main",
    "objective_value",
    "open_storage",
    "pruning_hook",
    "run_trials",
    "sample_overrides",
    "trial_config",
]

BEST_PARAMS = Path("params/best.yaml")  # dvc.yaml's tune out and train_best dep
STATE_TAG = "trial_state"  # on each trial's MLflow run: RUNNING, COMPLETE, PRUNED or FAIL
MAX_RETRIES = 3  # a trial whose process keeps dying is queued again at most this often
_SCHEMA_RACE_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # before each new try to open a new database
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_log = logging.getLogger(__name__)


class _NoExpectedTraceback(logging.Filter):
    """Optuna logs every failed trial with its traceback; an interrupt or a deepopt error
    is reported by the CLI in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt | DeepoptError):
            record.exc_info = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoExpectedTraceback())


# ---------------------------------------------------------------------------------------
# The search space and the trials' configs (pure)


def _suggest(trial: optuna.trial.BaseTrial, name: str, bounds: SearchRange, whole: bool) -> Any:
    if whole:
        step = int(bounds.step or 1)
        return trial.suggest_int(name, int(bounds.low), int(bounds.high), step=step, log=bounds.log)
    return trial.suggest_float(name, bounds.low, bounds.high, step=bounds.step, log=bounds.log)


def _whole(key: str) -> bool:
    return "int" in str(ScheduleConfig.model_fields[key].annotation)


def sample_overrides(
    trial: optuna.trial.BaseTrial, space: TuneSpace, base_optimizer: str
) -> dict[str, Any]:
    """Draw one point of ``space`` as run-config overrides, e.g. ``{"optim": {"name":
    "nesterov", "lr": 0.03, "momentum": 0.9}, "schedule": {"name": "plateau", ...}}``.

    Conditional parameters: ``momentum`` only for optimizers that take it, a schedule's
    knobs (named ``<schedule>.<knob>``) only when that schedule is drawn.
    """
    optim: dict[str, Any] = {"lr": _suggest(trial, "lr", space.lr, whole=False)}
    name = base_optimizer
    if space.optimizer is not None:
        name = str(trial.suggest_categorical("optimizer", list(space.optimizer)))
        optim["name"] = name
    elif space.nesterov:
        name = "nesterov" if trial.suggest_categorical("nesterov", [True, False]) else "momentum"
        optim["name"] = name
    if space.momentum is not None and "momentum" in OPTIMIZER_KNOBS[name]:
        optim["momentum"] = _suggest(trial, "momentum", space.momentum, whole=False)
    if space.weight_decay is not None:
        optim["weight_decay"] = _suggest(trial, "weight_decay", space.weight_decay, whole=False)
    overrides: dict[str, Any] = {"optim": optim}
    if space.schedule is not None:
        schedule = str(trial.suggest_categorical("schedule", list(space.schedule)))
        section: dict[str, Any] = {"name": schedule}
        for key, bounds in space.schedule[schedule].items():
            section[key] = _suggest(trial, f"{schedule}.{key}", bounds, whole=_whole(key))
        overrides["schedule"] = section
    return overrides


def trial_config(base: RunConfig, overrides: dict[str, Any], tune: TuneConfig) -> RunConfig:
    """``base`` with sampled ``overrides`` and the trial settings: ``tune.epochs``, the
    trial precision, training on the train split only, no MLflow model per trial."""
    settings = {
        "train": {
            "epochs": tune.epochs,
            "fit_on": "train",
            "precision": tune.precision or base.train.precision,
        },
        "mlflow": {"log_model": False},
    }
    return apply_overrides(base, {**overrides, **settings})


def config_overrides(base: RunConfig, target: RunConfig) -> dict[str, Any]:
    """The smallest overrides (params.yaml's shape) that turn ``base`` into ``target``.

    A section whose optimizer/schedule name changes is written whole (its knobs then
    start from the new variant's defaults); other sections list only changed keys.
    """
    old, new = base.model_dump(mode="json"), target.model_dump(mode="json")
    changes: dict[str, Any] = {}
    for section, value in new.items():
        if value == old[section]:
            continue
        if not isinstance(value, dict):
            changes[section] = value
        elif "name" in value and value["name"] != old[section].get("name"):
            changes[section] = {k: v for k, v in value.items() if v is not None}
        else:
            changes[section] = {k: v for k, v in value.items() if old[section].get(k) != v}
    if apply_overrides(base, changes) != target:
        raise DeepoptError(f"internal: overrides {changes} do not reproduce the tuned config")
    return changes


def best_overrides(
    params: Params, best: RunConfig, *, final_fit: str, epochs_run: int
) -> dict[str, Any]:
    """params/best.yaml: the best trial's config as overrides of the base config.

    ``train`` refits exactly the best trial (same config, seed and epochs); ``train+val``
    also learns from the validation split, for as many epochs as the trial ran, without
    early stopping (the validation metric is no longer held out).
    """
    base = params.base_run()
    final = apply_overrides(
        best,
        {
            "train": {"precision": base.train.precision},
            "mlflow": base.mlflow.model_dump(mode="json"),
        },
    )
    if final_fit == "train+val":
        final = apply_overrides(
            final,
            {
                "train": {"fit_on": "train+val", "epochs": epochs_run},
                "early_stop": {"enabled": False},
            },
        )
    return config_overrides(base, final)


def direction(early_stop: EarlyStopConfig) -> Literal["minimize", "maximize"]:
    """The study direction of the monitored metric: val_loss minimize, val_acc maximize."""
    mode = early_stop.mode
    if mode == "auto":
        mode = "max" if "acc" in early_stop.monitor else "min"
    return "maximize" if mode == "max" else "minimize"


def objective_value(
    history: list[dict[str, float]], early_stop: EarlyStopConfig, best_epoch: int
) -> float:
    """The monitored metric of the weights the run keeps: the last epoch's, or with
    ``restore_best`` the best epoch's."""
    monitor = early_stop.monitor
    if early_stop.restore_best and best_epoch >= 0:
        return next(r[monitor] for r in history if int(r["epoch"]) == best_epoch)
    return history[-1][monitor]


def _comparable(config: RunConfig) -> dict[str, Any]:
    """What changes a trial's result (not where it is logged, saved or how many threads)."""
    resolved = config.model_dump(mode="json")
    resolved.pop("mlflow")
    for key in ("checkpoint_dir", "threads", "eval_batch_size"):
        resolved["train"].pop(key)
    return resolved


def derive_study_name(experiment: str, space: TuneSpace, start: RunConfig, data_digest: str) -> str:
    """<experiment>-<hash of the space, the trials' base config and the data>."""
    blob = json.dumps(
        {"space": space.model_dump(mode="json"), "config": _comparable(start), "data": data_digest},
        sort_keys=True,
    )
    return f"{experiment}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def pruning_hook(
    trial: optuna.Trial, monitor: str, on_prune: Callable[[str], None]
) -> Callable[[LoopState], None]:
    """Report the monitored metric after each epoch; when the pruner says so, call
    ``on_prune(reason)`` and raise TrialPruned (from inside the training loop)."""

    def report(state: LoopState) -> None:
        epoch = state.epochs_done - 1  # 0-based: the step of the value
        value = state.history[-1][monitor]
        with interrupts.deferred():  # storage reads and writes: never cut in half
            trial.report(value, epoch)
            prune = trial.should_prune()
        if prune:
            reason = f"pruned after epoch {epoch + 1}: {monitor} {value:.4f}"
            on_prune(reason)
            raise optuna.TrialPruned(reason)

    return report


# ---------------------------------------------------------------------------------------
# Storage


@dataclass(frozen=True)
class StudyStorage:
    storage: BaseStorage
    heartbeat: bool  # RUNNING trials of dead processes are failed by Optuna
    shown: str  # the URL without password, for logs and tags


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRIES, inherit_intermediate_values=True
        )


def open_storage(url: str, tune: TuneConfig, key: str = "tune.storage") -> StudyStorage:
    """Open (creating tables or file) the storage at ``url``: any SQLAlchemy URL, with a
    heartbeat, or ``journal:///FILE`` (relative, ``journal:////abs`` absolute)."""
    try:
        scheme = check_storage_url(url, key)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if scheme == "journal":
        file = Path(url.removeprefix("journal:///"))
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            return StudyStorage(JournalStorage(JournalFileBackend(str(file))), False, url)
        except OSError as err:
            raise DeepoptError(f"Optuna storage {url}: {err.strerror or err}") from None
    import sqlalchemy

    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        try:
            Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            folder = f"cannot create the folder of its file ({err.strerror or err})"
            raise DeepoptError(f"Optuna storage {url}: {folder}") from None
        # Writers (workers, heartbeats) wait for the file lock instead of failing after 5 s.
        engine_kwargs["connect_args"] = {"timeout": 60}
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    for delay in (*_SCHEMA_RACE_DELAYS_S, None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=tune.heartbeat_interval,
                    grace_period=tune.heartbeat_grace,
                    heartbeat_stale_trial_callback=_retry_callback(),
                )
            return StudyStorage(storage, True, shown)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            # Workers that start together on an empty database race to create Optuna's
            # tables ("duplicate key ... pg_type", "relation already exists"): the loser
            # opens the winner's tables a moment later.
            if delay is None:
                first = " ".join(str(err).split())[:300]
                raise DeepoptError(f"Optuna storage {shown} cannot be opened: {first}") from None
            time.sleep(delay)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
            first = " ".join(str(err).split())[:300]
            raise DeepoptError(f"Optuna storage {shown} cannot be opened: {first}") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def _requeue(study: optuna.Study, number: int) -> None:
    """Queue trial ``number`` again (same params and reported values, at most MAX_RETRIES)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    _retry_callback()(study, copy.deepcopy(frozen))


def _fail_orphans(study: optuna.Study) -> list[int]:
    """Without a heartbeat: fail and requeue every RUNNING trial (call only while no worker
    of this study runs, i.e. when a session starts); their numbers."""
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        _requeue(study, number)
    return orphans


def _fail_stale(study: optuna.Study, storage: StudyStorage) -> None:
    if storage.heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


# ---------------------------------------------------------------------------------------
# Running trials


class _ClaimLock:
    """An exclusive lock file: one worker of this machine at a time counts the study's
    trials and creates the next one. Released by the objective once its trial exists."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._handle: Any = None

    def __enter__(self) -> _ClaimLock:
        self._handle = open(self._path, "a")  # closed in release()
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _DatabaseClaimLock:
    """A PostgreSQL advisory lock on the study: one worker of any machine at a time counts
    the study's trials and creates the next one (a lock file orders one machine's only).
    Transaction-scoped, so it is released whatever happens to the connection."""

    def __init__(self, engine: Any, study_name: str) -> None:
        self._engine = engine
        digest = hashlib.sha256(f"deepopt-claim:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # a bigint lock id
        self._connection: Any = None

    def __enter__(self) -> _DatabaseClaimLock:
        import sqlalchemy

        self._connection = self._engine.connect()
        self._connection.begin()
        self._connection.execute(
            sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._key}
        )
        return self

    def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.rollback()  # ends the transaction and with it the lock
            connection.close()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _claim_lock(
    storage: StudyStorage, path: Path, study_name: str
) -> _ClaimLock | _DatabaseClaimLock:
    """The lock under which a worker counts and claims: the database's own on PostgreSQL
    (workers on many machines), else the lock file ``path`` (this machine's workers)."""
    engine = getattr(storage.storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        return _DatabaseClaimLock(engine, study_name)
    return _ClaimLock(path)


# Ctrl-C and SIGTERM wait while Optuna stores a trial: from the start of a claim until the
# objective runs (an interrupt in between would leave the new trial RUNNING), and from the end
# of a trial's training until Optuna has recorded it (an interrupt in between would fail a
# trained trial, and its retry would train it again).
_HELD = interrupts.GATE


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    storage: StudyStorage,
    lock_path: Path,
    deadline: float | None = None,
    poll_s: float = 1.0,
    orphaned: Callable[[], bool] = lambda: False,
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones (or ``deadline``, a
    time.monotonic() value, passes, or the session that started this worker is gone);
    the number this process ran.

    With a heartbeat, a worker that finds all remaining trials running waits for them:
    one whose process died is failed and queued again, and someone has to run it.
    """
    ran = 0
    lock = _claim_lock(storage, lock_path, study.study_name)

    def claimed(trial: optuna.Trial) -> float:
        lock.release()  # the trial exists now: other workers may count it
        if _HELD.release():  # the interrupt came while Optuna created this trial
            _requeue(trial.study, trial.number)  # a retry keeps its checkpoint to continue
            raise KeyboardInterrupt  # Optuna fails the trial, then lets it through
        return objective(trial)

    while (deadline is None or time.monotonic() < deadline) and not orphaned():
        # Held from here until the objective runs (``claimed`` releases it): an interrupt
        # inside Optuna's ask(), after it stored the new trial, would leave that trial
        # RUNNING with nobody to end it.
        _HELD.hold()
        try:
            with lock:
                _fail_stale(study, storage)
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state in FINISHED for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if finished + running < n_trials:
                    study.optimize(claimed, n_trials=1)
                    ran += 1
                    continue
        finally:
            if _HELD.release():
                raise KeyboardInterrupt  # the trial it waited for is recorded
        if running == 0 or not storage.heartbeat:
            break
        time.sleep(poll_s)
    return ran


@dataclass(frozen=True)
class _Session:
    """What every trial of this process shares."""

    study_name: str
    base: RunConfig
    tune: TuneConfig
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    data_meta: dict[str, Any]
    experiment_id: str
    parent_run_id: str | None
    tags: dict[str, str]
    checkpoint_root: Path
    orphaned: Callable[[], bool]  # a spawned worker stops when its session is gone


def _trial_runs(session: _Session, number: int, status: str | None = None) -> list[str]:
    tags = {"optuna_study": session.study_name, "optuna_trial": str(number)}
    return tracking.find_runs(session.experiment_id, tags=tags, status=status)


def _mark_runs(
    session: _Session, number: int, state: str, reason: str, interrupted: bool = False
) -> None:
    """Tag the trial's run with its final state; end it if training left it running
    (KILLED when pruned or interrupted, else FAILED)."""
    for run_id in _trial_runs(session, number):
        tracking.set_tags(run_id, {STATE_TAG: state})
        if tracking.run_status(run_id) == "RUNNING":
            killed = state == "PRUNED" or interrupted
            tracking.end_run(run_id, "KILLED" if killed else "FAILED", reason=reason)


def _adopt_checkpoint(previous: Path, folder: Path, config: RunConfig, digest: str) -> int:
    """Continue a dead trial's last checkpoint in this retry's folder, without its MLflow
    run id (the retry gets its own run; the earlier epochs are logged into it again);
    the epochs it had done (0: none to continue)."""
    source = checkpoint_file(previous, config, config.seed, digest)
    try:
        saved = load_checkpoint(source)
    except DataError as err:  # a damaged file: the retry starts from scratch
        _log.warning("not continuing %s: %s", source, err)
        saved = None
    if saved is None or saved["loop"].get("optimizer") is None:  # nothing, or not resumable
        return 0
    # A finished one too (its process died before Optuna recorded the trial): the retry
    # then trains no epoch again, it only records the run.
    adopted = {**saved, "run_id": None, "finished": False}
    save_checkpoint(checkpoint_file(folder, config, config.seed, digest), adopted)
    shutil.rmtree(previous, ignore_errors=True)
    return int(saved["loop"]["epochs_done"])


def _objective(session: _Session) -> Callable[[optuna.Trial], float]:
    tune, monitor = session.tune, session.base.early_stop.monitor

    def objective(trial: optuna.Trial) -> float:
        number = trial.number
        config = trial_config(
            session.base, sample_overrides(trial, tune.space, session.base.optim.name), tune
        )
        folder = session.checkpoint_root / f"trial-{number}"
        previous = trial.user_attrs.get("checkpoint_dir")  # inherited by a queued retry

        def pruned(reason: str) -> None:
            trial.set_user_attr("reason", reason)
            for run_id in _trial_runs(session, number, status="RUNNING"):
                tracking.set_tags(run_id, {STATE_TAG: "PRUNED"})
                tracking.end_run(run_id, "KILLED", reason=reason)

        hook = pruning_hook(trial, monitor, pruned)

        def on_epoch(state: LoopState) -> None:
            if session.orphaned():
                raise KeyboardInterrupt("the tune session that started this worker is gone")
            hook(state)

        try:
            with interrupts.deferred():  # the trial's bookkeeping, whole or not at all
                if previous is not None:
                    trial.set_user_attr("retry_of", trial.user_attrs.get("number"))
                    done = _adopt_checkpoint(
                        Path(previous), folder, config, session.data_meta["digest"]
                    )
                    trial.set_user_attr("continued_from_epoch", done)
                trial.set_user_attr("number", number)
                trial.set_user_attr("checkpoint_dir", str(folder))
            result = train_tracked(
                config,
                session.tensors,
                data_meta=session.data_meta,
                experiment_id=session.experiment_id,
                run_name=f"trial-{number}",
                member=Member(replica=0, index=0, seed=config.seed),
                checkpoint_dir=folder,
                tags={
                    **session.tags,
                    "optuna_study": session.study_name,
                    "optuna_trial": str(number),
                    STATE_TAG: "RUNNING",
                },
                parent_run_id=session.parent_run_id,
                on_epoch=on_epoch,
            )
        except optuna.TrialPruned:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except DivergedError as err:
            # Pruned, not failed: TPE learns from pruned trials and ignores failed ones.
            trial.report(float("nan"), _last_step(trial) + 1)  # the epoch that diverged
            reason = f"diverged: {err}"
            trial.set_user_attr("reason", reason)
            _mark_runs(session, number, "PRUNED", reason)
            shutil.rmtree(folder, ignore_errors=True)
            raise optuna.TrialPruned(reason) from None
        except KeyboardInterrupt as err:
            reason = f"interrupted ({err or 'Ctrl-C or SIGTERM'}); queued again"
            trial.set_user_attr("reason", reason)
            _mark_runs(session, number, "FAIL", reason, interrupted=True)
            _requeue(trial.study, number)
            raise
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:500]
            trial.set_user_attr("reason", reason)
            _mark_runs(session, number, "FAIL", reason)
            raise
        _HELD.hold()  # trained: an interrupt now waits until Optuna has recorded the trial
        fit = result.fit
        trial.set_user_attr("reason", fit.stop_reason)
        trial.set_user_attr("epochs_run", fit.epochs_run)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        tracking.set_tags(result.run_id, {STATE_TAG: "COMPLETE"})
        shutil.rmtree(folder, ignore_errors=True)
        return objective_value(fit.history, config.early_stop, fit.best_epoch)

    return objective


def _last_step(trial: optuna.Trial) -> int:
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return max(frozen.intermediate_values, default=-1)


# ---------------------------------------------------------------------------------------
# The study, the session and its outputs


def _sampler(
    tune: TuneConfig, seed: int, existing: int, worker: int
) -> optuna.samplers.BaseSampler:
    # One seed per (study size, worker): a resumed session or a second worker must not
    # redraw the random startup points already drawn; a fresh one-worker study repeats.
    base = tune.sampler_seed if tune.sampler_seed is not None else seed
    session_seed = int(np.random.SeedSequence([base, existing, worker]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: multivariate TPE per set of parameters drawn together (the schedules'
        # conditional knobs).
        return optuna.samplers.TPESampler(
            seed=session_seed, n_startup_trials=tune.startup_trials, group=True
        )


def _pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_epochs
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min(max(1, tune.pruner_warmup_epochs), tune.epochs),
            max_resource=tune.epochs,
            reduction_factor=3,
        )
    return optuna.pruners.NopPruner()


def _open_study(
    name: str,
    storage: StudyStorage,
    goal: Literal["minimize", "maximize"],
    tune: TuneConfig,
    seed: int,
    worker: int,
) -> optuna.Study:
    """Create the study or load it; with this session's sampler and pruner."""
    try:
        study = optuna.create_study(
            study_name=name, storage=storage.storage, direction=goal, load_if_exists=True
        )
    except ValueError as err:
        raise ConfigError(f"study '{name}' in {storage.shown}: {err}") from None
    if study.direction.name.lower() != goal:
        raise ConfigError(
            f"study '{name}' in {storage.shown} is to {study.direction.name.lower()}, but "
            f"early_stop.monitor asks to {goal}; set another tune.study_name"
        )
    existing = len(study.get_trials(deepcopy=False))
    return optuna.load_study(
        study_name=name,
        storage=storage.storage,
        sampler=_sampler(tune, seed, existing, worker),
        pruner=_pruner(tune),
    )


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def _close_dead_runs(experiment_id: str, study: optuna.Study) -> int:
    """End the MLflow runs of failed trials that their (killed) process left RUNNING."""
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        tags = {"optuna_study": study.study_name, "optuna_trial": str(trial.number)}
        for run_id in tracking.find_runs(experiment_id, tags=tags, status="RUNNING"):
            tracking.set_tags(run_id, {STATE_TAG: "FAIL"})
            tracking.end_run(
                run_id, "FAILED", reason="the trial's process died; the trial was queued again"
            )
            closed += 1
    return closed


def _log_plots(run_id: str, study: optuna.Study) -> list[str]:
    """Optuna's history, importance and parallel-coordinate plots as PNG artifacts; a plot
    Optuna cannot draw for this study (too few trials, a constant objective) is skipped."""
    from optuna.visualization import matplotlib as views

    from deepopt.plots import plt  # selects the Agg backend

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # The parallel coordinates of the parameters every trial has (not a schedule's knobs).
    common = sorted(set.intersection(*(set(t.params) for t in complete))) if complete else []
    views_needing: list[tuple[str, Callable[[optuna.Study], Any], int]] = [
        ("optimization_history", views.plot_optimization_history, 1),
        ("param_importances", views.plot_param_importances, 2),
        ("parallel_coordinate", lambda s: views.plot_parallel_coordinate(s, params=common), 2),
    ]
    logged = []
    for name, draw, needs in views_needing:
        if len(complete) < needs:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices of every view
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as err:
            _log.warning("skipping the %s plot: %s", name, err)
            plt.close("all")
            continue
        figure = np.asarray(axes).flat[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        tracking.log_figure(run_id, figure, f"{name}.png")
        plt.close(figure)
        logged.append(name)
    return logged


def _write_best(
    params: Params, study: optuna.Study, base: RunConfig, storage: StudyStorage
) -> tuple[FrozenTrial, dict[str, Any]]:
    """params/best.yaml from the best complete trial (DeepoptError if there is none)."""
    tune = params.tune
    try:
        best = study.best_trial
    except ValueError:
        raise DeepoptError(
            f"study '{study.study_name}' has no complete trial ({_counts(study)}); "
            f"{BEST_PARAMS} not written"
        ) from None
    fixed = optuna.trial.FixedTrial(best.params, number=best.number)
    config = trial_config(base, sample_overrides(fixed, tune.space, base.optim.name), tune)
    epochs_run = int(best.user_attrs.get("epochs_run", tune.epochs))
    overrides = best_overrides(params, config, final_fit=tune.final_fit, epochs_run=epochs_run)
    monitor = base.early_stop.monitor
    header = (
        f"# Written by `deepopt tune`: trial {best.number} of study {study.study_name}\n"
        f"# ({storage.shown}), {monitor} {best.value:.6g} after {epochs_run} epochs; the\n"
        f"# overrides of the base config for `deepopt train --overrides` "
        f"(tune.final_fit: {tune.final_fit}).\n"
    )
    write_text(BEST_PARAMS, header + yaml.safe_dump(overrides, sort_keys=False))
    return best, overrides


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """Interrupt the workers once (each fails and requeues its trial), then wait."""
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in workers:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_workers(
    params: Params, *, study: str, storage: str, n_trials: int, parent_run: str, folder: Path
) -> None:
    """``tune.workers`` processes of ``deepopt tune --worker`` on the same study and params.

    They start in their own session, so a Ctrl-C reaches them once, forwarded from here.
    """
    count = params.tune.workers
    threads = max(1, (params.train.threads or os.cpu_count() or 1) // count)
    folder.mkdir(parents=True, exist_ok=True)
    # The params as this session validated them, even if params.yaml changes meanwhile.
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="session-params-", dir=folder, delete=False
    ) as handle:
        yaml.safe_dump(params.model_dump(mode="json"), handle)
    params_file = Path(handle.name)
    command = [sys.executable, "-m", "deepopt.cli", "--params", str(params_file), "tune"]
    options = ["--worker", "--storage", storage, "--n-trials", str(n_trials)]
    options += ["--study-name", study, "--parent-run", parent_run, "--threads", str(threads)]
    options += ["--session-pid", str(os.getpid())]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            workers.append(
                subprocess.Popen(
                    [*command, *options, "--worker-index", str(index)],
                    stdout=subprocess.DEVNULL,  # each prints a JSON summary; ours is the one
                    start_new_session=True,
                )
            )
        codes = [process.wait() for process in workers]
    except KeyboardInterrupt:
        _stop_workers(workers)
        raise
    finally:
        params_file.unlink(missing_ok=True)
    if EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    failed = [f"worker {i} exited {code}" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise DeepoptError(f"tune: {', '.join(failed)}; its error is printed above")


def main(
    params: Params,
    worker: bool = False,
    storage: str | None = None,
    n_trials: int | None = None,
    study_name: str | None = None,
    parent_run: str | None = None,
    worker_index: int = 0,
    threads: int | None = None,
    session_pid: int | None = None,
    **_: object,
) -> dict[str, Any]:
    tune = params.tune
    total = tune.n_trials if n_trials is None else n_trials
    if total < 1:
        raise ConfigError(f"--n-trials: {total} must be at least 1")
    base = resolve_experiment(params, tune.experiment)
    # Before the study: it must not run for hours and then fail to write its result.
    check_writable(
        *([] if worker else [BEST_PARAMS]),
        paths.checkpoint_dir(base.train.checkpoint_dir, "tune") / "claim.lock",
    )
    url = storage or tune.storage
    handle = open_storage(url, tune, key="--storage" if storage else "tune.storage")
    experiment = tune.experiment or BASE_EXPERIMENT
    start = trial_config(base, {}, tune)
    data = load_prepared(base.data, base.seed)
    name = study_name or tune.study_name
    name = name or derive_study_name(experiment, tune.space, start, data.meta["digest"])
    tracking.configure()
    experiment_id = tracking.ensure_experiment(base.mlflow.experiment)
    study = _open_study(name, handle, direction(start.early_stop), tune, params.seed, worker_index)
    root = paths.checkpoint_dir(base.train.checkpoint_dir, "tune") / name
    tags = {
        **tracking.run_tags(dataset=base.data.name, meta=data.meta),
        "experiment": experiment,
        "tune_worker": str(worker_index),
    }
    in_process = worker or tune.workers == 1

    def orphaned() -> bool:
        # The session passes its pid: a worker reparented after its session was killed
        # must not keep training unseen (checked per epoch and before each trial).
        return session_pid is not None and os.getppid() != session_pid

    deadline = time.monotonic() + tune.timeout if tune.timeout else None

    def run_here(parent_run_id: str) -> int:
        cores = base.train.threads or os.cpu_count() or 1
        torch.set_num_threads(threads or cores)
        session = _Session(
            study_name=name,
            base=base,
            tune=tune,
            tensors=split_tensors(data, start.train.precision),
            data_meta=data.meta,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            tags=tags,
            checkpoint_root=root,
            orphaned=orphaned,
        )
        return run_trials(
            study,
            _objective(session),
            n_trials=total,
            storage=handle,
            lock_path=root / "claim.lock",
            deadline=deadline,
            poll_s=tune.heartbeat_interval,
            orphaned=orphaned,
        )

    if worker and parent_run:
        ran = run_here(parent_run)
        return {"stage": "tune", "study": name, "worker": worker_index, "trials_run": ran}
    if not worker and not handle.heartbeat:
        with _ClaimLock(root / "claim.lock"):
            orphans = _fail_orphans(study)
        if orphans:
            print(f"[tune] failed and requeued orphaned trials {orphans}", file=sys.stderr)
    before = _counts(study)
    print(
        f"[tune] study {name} in {handle.shown}: {before['COMPLETE'] + before['PRUNED']} of "
        f"{total} trials finished",
        file=sys.stderr,
        flush=True,
    )
    session_tags = {**tags, "optuna_study": name, "tune_session": "worker" if worker else "main"}
    tic = time.perf_counter()
    with tracking.tracked_run(experiment_id, f"tune {name}", tags=session_tags) as run_id:
        tracking.log_params(
            run_id,
            {"tune": tune.model_dump(mode="json"), "study_name": name, "storage": handle.shown},
        )
        if in_process:
            ran = run_here(run_id)
        else:
            _run_workers(
                params, study=name, storage=url, n_trials=total, parent_run=run_id, folder=root
            )
            ran = sum(_counts(study).values()) - sum(before.values())
        closed = _close_dead_runs(experiment_id, study)
        counts = _counts(study)
        summary: dict[str, Any] = {
            "stage": "tune",
            "study": name,
            "storage": handle.shown,
            "trials": {state: n for state, n in counts.items() if n},
            "trials_this_session": ran,
            "dead_runs_closed": closed,
            "seconds": round(time.perf_counter() - tic, 1),
        }
        tracking.log_metrics(
            run_id,
            {f"trials_{state.lower()}": n for state, n in counts.items()}
            | {"session_seconds": summary["seconds"]},
        )
        if worker:
            return summary
        best, overrides = _write_best(params, study, base, handle)
        assert best.value is not None  # a complete trial
        tracking.log_metrics(run_id, {"best_value": best.value})
        tracking.log_params(run_id, {"best": best.params})
        tracking.set_tags(
            run_id,
            {
                "best_trial": str(best.number),
                "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
            },
        )
        tracking.log_artifact(run_id, BEST_PARAMS)
        summary["plots"] = _log_plots(run_id, study)
    return {
        **summary,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_yaml": str(BEST_PARAMS),
        "overrides": overrides,
    }
