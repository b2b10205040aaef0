"""The search space and the trials' configs: sampling, overrides, direction and study names.

Pure functions of the config: no storage, no training, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import optuna

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
    integer_field,
)
from deepopt.errors import DeepoptError

__all__ = [
    "best_overrides",
    "config_overrides",
    "derive_study_name",
    "direction",
    "objective_value",
    "sample_overrides",
    "trial_config",
]


def _suggest(trial: optuna.trial.BaseTrial, name: str, bounds: SearchRange, whole: bool) -> Any:
    if whole:
        step = int(bounds.step or 1)
        return trial.suggest_int(name, int(bounds.low), int(bounds.high), step=step, log=bounds.log)
    return trial.suggest_float(name, bounds.low, bounds.high, step=bounds.step, log=bounds.log)


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
    knobs = OPTIMIZER_KNOBS[name]
    if space.rho is not None and "rho" in knobs:
        optim["rho"] = _suggest(trial, "rho", space.rho, whole=False)
    if "betas" in knobs and (space.beta1 is not None or space.beta2 is not None):
        betas = list(knobs["betas"])
        for index, key in enumerate(("beta1", "beta2")):
            bounds = getattr(space, key)
            if bounds is not None:
                betas[index] = _suggest(trial, key, bounds, whole=False)
        optim["betas"] = betas
    overrides: dict[str, Any] = {"optim": optim}
    if space.schedule is not None:
        schedule = str(trial.suggest_categorical("schedule", list(space.schedule)))
        section: dict[str, Any] = {"name": schedule}
        for key, bounds in space.schedule[schedule].items():
            whole = integer_field(ScheduleConfig, key)
            section[key] = _suggest(trial, f"{schedule}.{key}", bounds, whole=whole)
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


# Knobs the search space gained after studies existed: a space that does not search them
# hashes as before, so those studies resume under their names.
_LATER_KNOBS = ("rho", "beta1", "beta2")


def derive_study_name(experiment: str, space: TuneSpace, start: RunConfig, data_digest: str) -> str:
    """<experiment>-<hash of the space, the trials' base config and the data>."""
    searched = space.model_dump(mode="json")
    for key in _LATER_KNOBS:  # unset, they leave the names of studies made before them
        if searched[key] is None:
            del searched[key]
    blob = json.dumps(
        {"space": searched, "config": _comparable(start), "data": data_digest}, sort_keys=True
    )
    return f"{experiment}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
