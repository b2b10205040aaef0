"""Running trials: claiming them one at a time, the objective (one tracked training run per
trial), pruning, continuing a dead trial's checkpoint, and each trial's MLflow run state."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from deepopt import interrupts, tracking
from deepopt.config import RunConfig, TuneConfig
from deepopt.errors import DataError, DeepoptError, DivergedError, one_line
from deepopt.training import LoopState, checkpoint_file, load_checkpoint, save_checkpoint
from deepopt.training.member import train_tracked
from deepopt.training.seeds import Member
from deepopt.tuning.space import objective_value, sample_overrides, trial_config
from deepopt.tuning.storage import StudyStorage, claim_lock, fail_stale, requeue

__all__ = [
    "FINISHED",
    "STATE_TAG",
    "TrialSession",
    "make_objective",
    "pruning_hook",
    "run_trials",
]

STATE_TAG = "trial_state"  # on each trial's MLflow run: RUNNING, COMPLETE, PRUNED or FAIL
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_log = logging.getLogger(__name__)

# Ctrl-C and SIGTERM wait while Optuna stores a trial: from the start of a claim until the
# objective runs (an interrupt in between would leave the new trial RUNNING), and from the end
# of a trial's training until Optuna has recorded it (an interrupt in between would fail a
# trained trial, and its retry would train it again).
_HELD = interrupts.GATE


class _NoExpectedTraceback(logging.Filter):
    """Optuna logs every failed trial with its traceback; an interrupt or a deepopt error
    is reported by the CLI in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt | DeepoptError):
            record.exc_info = None
        return True


_OPTUNA_TRIAL_LOG = logging.getLogger("optuna.study._optimize")
_QUIET = _NoExpectedTraceback()


@contextmanager
def _expected_failures_in_one_line() -> Iterator[None]:
    """Optuna's failed-trial log without the tracebacks of expected failures, while trials
    run (installed once however deeply nested; removed by whoever installed it)."""
    if _QUIET in _OPTUNA_TRIAL_LOG.filters:
        yield
        return
    _OPTUNA_TRIAL_LOG.addFilter(_QUIET)
    try:
        yield
    finally:
        _OPTUNA_TRIAL_LOG.removeFilter(_QUIET)


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

    Finished is complete + pruned. Before each trial a worker counts finished and running
    trials under the claim lock (see ``claim_lock``); Optuna's MaxTrialsCallback counts
    only after a trial ends, so N parallel workers would overshoot by up to N - 1 trials.
    With a heartbeat, a worker that finds all remaining trials running waits for them:
    one whose process died is failed and queued again, and someone has to run it.
    """
    ran = 0
    lock = claim_lock(storage, lock_path, study.study_name)

    def claimed(trial: optuna.Trial) -> float:
        lock.release()  # the trial exists now: other workers may count it
        if _HELD.release():  # the interrupt came while Optuna created this trial
            requeue(trial.study, trial.number)  # a retry keeps its checkpoint to continue
            raise KeyboardInterrupt  # Optuna fails the trial, then lets it through
        try:
            return objective(trial)
        except BaseException:
            # Optuna records the trial (FAIL or PRUNED) next: a second Ctrl-C or SIGTERM
            # inside its tell() would leave the trial RUNNING and print Optuna's own
            # UnboundLocalError traceback. Held until optimize() returns (the finally below).
            if not _HELD.held:
                _HELD.hold()
            raise

    with _expected_failures_in_one_line():
        while (deadline is None or time.monotonic() < deadline) and not orphaned():
            # Held from here until the objective runs (``claimed`` releases it): an
            # interrupt inside Optuna's ask(), after it stored the new trial, would leave
            # that trial RUNNING with nobody to end it.
            _HELD.hold()
            try:
                with lock:
                    fail_stale(study, storage)
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
class TrialSession:
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


def _trial_runs(session: TrialSession, number: int, status: str | None = None) -> list[str]:
    tags = {"optuna_study": session.study_name, "optuna_trial": str(number)}
    return tracking.find_runs(session.experiment_id, tags=tags, status=status)


def _mark_runs(
    session: TrialSession, number: int, state: str, reason: str, interrupted: bool = False
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


def _last_reported_step(trial: optuna.Trial) -> int:
    """The step of the trial's last value reported to the pruner (-1: none yet)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return max(frozen.intermediate_values, default=-1)


def make_objective(session: TrialSession) -> Callable[[optuna.Trial], float]:
    """The objective: ``train_tracked`` on the sampled config (the one code path that
    trains a network), the monitored metric reported to the pruner every epoch.

    A queued retry of a dead or interrupted trial continues its last checkpoint under its
    own number, folder and MLflow run, so each trial has exactly one run. A diverging
    trial (NaN loss) is recorded as pruned (TPE then treats its region as bad; failed
    trials it ignores), with the reason in the user attr ``reason``.
    """
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
            _HELD.hold()  # its records, then Optuna's: see run_trials
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except DivergedError as err:
            _HELD.hold()  # its records, then Optuna's: see run_trials
            # Pruned, not failed: TPE learns from pruned trials and ignores failed ones.
            # At the step after the last reported one: the epoch that diverged.
            trial.report(float("nan"), _last_reported_step(trial) + 1)
            reason = f"diverged: {err}"
            trial.set_user_attr("reason", reason)
            _mark_runs(session, number, "PRUNED", reason)
            shutil.rmtree(folder, ignore_errors=True)
            raise optuna.TrialPruned(reason) from None
        except KeyboardInterrupt as err:
            _HELD.hold()  # its records, then Optuna's: see run_trials
            reason = f"interrupted ({err or 'Ctrl-C or SIGTERM'}); queued again"
            trial.set_user_attr("reason", reason)
            _mark_runs(session, number, "FAIL", reason, interrupted=True)
            requeue(trial.study, number)
            raise
        except Exception as err:
            _HELD.hold()  # its records, then Optuna's: see run_trials
            reason = one_line(f"{type(err).__name__}: {err}", limit=500)
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
