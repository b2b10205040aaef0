"""The study: its seeded sampler and pruner, opening or resuming it, counting its trials,
Optuna's plots and params/best.yaml from its best trial."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from deepopt import tracking
from deepopt.config import Params, RunConfig, TuneConfig
from deepopt.config.loading import TUNE_OVERRIDES_END, TUNE_OVERRIDES_HEADER
from deepopt.errors import ConfigError, DeepoptError
from deepopt.files import write_text
from deepopt.paths import BEST_PARAMS
from deepopt.tuning.space import best_overrides, sample_overrides, trial_config
from deepopt.tuning.storage import StudyStorage
from deepopt.tuning.trials import FINISHED, STATE_TAG

__all__ = [
    "best_trial",
    "build_pruner",
    "build_sampler",
    "close_dead_runs",
    "count_trials",
    "log_plots",
    "open_study",
    "write_best",
]

_log = logging.getLogger(__name__)


def build_sampler(
    tune: TuneConfig, seed: int, existing: int, worker: int
) -> optuna.samplers.BaseSampler:
    """Multivariate TPE, seeded per (study size, worker): a resumed session or a second
    worker must not redraw the random startup points already drawn; a fresh one-worker
    study repeats."""
    base = tune.sampler_seed if tune.sampler_seed is not None else seed
    session_seed = int(np.random.SeedSequence([base, existing, worker]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: multivariate TPE per set of parameters drawn together (the schedules'
        # conditional knobs).
        return optuna.samplers.TPESampler(
            seed=session_seed, n_startup_trials=tune.startup_trials, group=True
        )


def build_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median, hyperband (over the trials' epochs) or none."""
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


def open_study(
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
        sampler=build_sampler(tune, seed, existing, worker),
        pruner=build_pruner(tune),
    )


def count_trials(study: optuna.Study) -> dict[str, int]:
    """The study's trials per state name (every state, zeros included)."""
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def close_dead_runs(experiment_id: str, study: optuna.Study) -> int:
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


def log_plots(run_id: str, study: optuna.Study) -> list[str]:
    """Optuna's history, importance and parallel-coordinate plots as PNG artifacts; a plot
    Optuna cannot draw for this study (too few trials, a constant objective) is skipped."""
    from optuna.visualization import matplotlib as views

    from deepopt.figures import pyplot

    plt = pyplot()  # Optuna's views draw through pyplot, on Agg

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


def best_trial(study: optuna.Study, within: int | None = None) -> FrozenTrial | None:
    """The best complete trial, of the first ``within`` finished ones (by trial number)
    with ``within``; None when there is none."""
    finished = sorted(
        study.get_trials(deepcopy=False, states=FINISHED), key=lambda trial: trial.number
    )
    counted = finished if within is None else finished[:within]
    complete = [t for t in counted if t.state == TrialState.COMPLETE and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best: FrozenTrial | None = None
    for trial in complete:  # in number order: a tie keeps the earlier trial, as Optuna's
        value, kept = float(trial.value or 0.0), float(best.value or 0.0) if best else 0.0
        if best is None or (value > kept if maximize else value < kept):
            best = trial
    return best


def write_best(
    params: Params,
    study: optuna.Study,
    base: RunConfig,
    storage: StudyStorage,
    *,
    path: Path = BEST_PARAMS,
    within: int | None = None,
) -> tuple[FrozenTrial, dict[str, Any]]:
    """``path`` (params/best.yaml) from the best complete trial (of the first ``within``
    finished ones with ``within``); DeepoptError if there is none."""
    tune = params.tune
    best = best_trial(study, within)
    if best is None:
        raise DeepoptError(
            f"study '{study.study_name}' has no complete trial ({count_trials(study)}); "
            f"{path} not written"
        )
    fixed = optuna.trial.FixedTrial(best.params, number=best.number)
    config = trial_config(base, sample_overrides(fixed, tune.space, base.optim.name), tune)
    epochs_run = int(best.user_attrs.get("epochs_run", tune.epochs))
    overrides = best_overrides(params, config, final_fit=tune.final_fit, epochs_run=epochs_run)
    monitor = base.early_stop.monitor
    header = (
        f"{TUNE_OVERRIDES_HEADER}: trial {best.number} of study {study.study_name}\n"
        f"# ({storage.shown}), {monitor} {best.value:.6g} after {epochs_run} epochs; the\n"
        f"# overrides of the base config for `deepopt train --overrides` "
        f"(tune.final_fit: {tune.final_fit}).\n"
    )
    body = yaml.safe_dump(overrides, sort_keys=False)
    write_text(path, f"{header}{body}{TUNE_OVERRIDES_END}\n")  # the end: none cut short
    return best, overrides
