"""The compare pipeline's studies: one per optimizer, run through deepopt.tuning with the
same budget, epoch cap and trial settings, and what each cost and found (studies.json)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from deepopt.config import Params, resolve_compare
from deepopt.tuning import best_trial, direction
from deepopt.tuning.trials import FINISHED

__all__ = [
    "monitor_goal",
    "study_label",
    "study_params",
    "study_summary",
    "trial_epochs",
]


def study_label(optimizer: str) -> str:
    """What the study's name starts with: compare-<optimizer>-<hash of space, config, data>."""
    return f"compare-{optimizer}"


def study_params(params: Params, optimizer: str) -> Params:
    """The params a tune session of ``optimizer``'s study runs with (and hands its workers):
    ``resolve_compare``'s config as the base, and a ``tune`` section with the compare
    budget, epoch cap, storage, workers and that optimizer's space; the sampler, pruner and
    heartbeat settings are tune's, the same for every optimizer."""
    compare = params.compare
    tune = params.tune.model_dump(mode="json") | {
        "experiment": None,  # the base below is the compared network already
        "n_trials": compare.budget,
        # No session deadline: a study cut short by one would hold fewer trials than the
        # others, and DVC would take the stage as done.
        "timeout": None,
        "epochs": compare.epochs,
        "workers": compare.workers,
        "storage": compare.storage,
        "study_name": None,
        "final_fit": "train",  # the tuned runs learn from what the trials learned from
        "space": compare.space.tune_space(optimizer).model_dump(mode="json"),
    }
    base = resolve_compare(params, optimizer).model_dump(mode="json")
    return Params.model_validate({**base, "tune": tune})


def trial_epochs(trial: FrozenTrial) -> int:
    """Epochs a finished trial trained: a complete one's epochs_run, a pruned one's reports
    (one per epoch, the diverged epoch's too)."""
    if trial.state == TrialState.COMPLETE and "epochs_run" in trial.user_attrs:
        return int(trial.user_attrs["epochs_run"])
    return len(trial.intermediate_values)


def _seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def study_summary(study: optuna.Study, budget: int) -> dict[str, Any]:
    """studies.json's entry of one study: its finished trials (complete, pruned), the epochs
    and seconds of the first ``budget`` of them, and the best of those. ``extended``: it
    holds more finished trials than the budget (its best is still of the first ``budget``)."""
    trials = study.get_trials(deepcopy=False)
    finished = sorted((t for t in trials if t.state in FINISHED), key=lambda t: t.number)
    counted = finished[:budget]
    best = best_trial(study, budget)
    return {
        "study": study.study_name,
        "finished": len(finished),
        "complete": sum(t.state == TrialState.COMPLETE for t in counted),
        "pruned": sum(t.state == TrialState.PRUNED for t in counted),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "epochs": sum(trial_epochs(t) for t in counted),
        "seconds": round(sum(_seconds(t) for t in counted), 1),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "extended": len(finished) > budget,
    }


def monitor_goal(params: Params) -> tuple[str, str]:
    """The studies' objective: the monitored metric and minimize/maximize."""
    early_stop = resolve_compare(params, params.compare.optimizers[0]).early_stop
    return early_stop.monitor, direction(early_stop)
