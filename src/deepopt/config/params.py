"""The whole of params.yaml (``Params``) and how a run config is resolved from it:
experiments and transfer.overrides applied to the base config (``apply_overrides``)."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from deepopt.config.compare import KERAS_DEFAULTS, CompareConfig
from deepopt.config.limits import MAX_FINETUNE_IMAGES
from deepopt.config.lr_find import LrFindConfig
from deepopt.config.messages import format_validation_error
from deepopt.config.names import check_experiment_name
from deepopt.config.run import (
    OPTIMIZER_KNOBS,
    RUN_SECTIONS,
    SCHEDULE_KNOBS,
    MatrixConfig,
    RunConfig,
)
from deepopt.config.transfer import TransferConfig
from deepopt.config.tune import TuneConfig
from deepopt.errors import ConfigError

__all__ = [
    "Params",
    "apply_overrides",
    "config_hash",
    "resolve_compare",
    "resolve_experiment",
    "resolve_transfer",
]


class Params(RunConfig):
    """The whole of params.yaml: the base run config, the matrix of experiments and more."""

    matrix: MatrixConfig = MatrixConfig()
    # name -> overrides of the base run config (any key of the sections above but data).
    experiments: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tune: TuneConfig = TuneConfig()
    transfer: TransferConfig = TransferConfig()
    # `deepopt lr-find`: the learning-rate range test (fastai's defaults).
    lr_find: LrFindConfig = LrFindConfig()
    # compare/dvc.yaml: every optimizer at its defaults and tuned with the same budget.
    compare: CompareConfig = CompareConfig()

    @field_validator("experiments", mode="before")
    @classmethod
    def _experiment_names(cls, value: Any) -> Any:
        for name in value if isinstance(value, dict) else ():
            check_experiment_name(name, "experiments")
        return value

    @model_validator(mode="after")
    def _transfer_resolves(self) -> Params:
        batch = resolve_transfer(self).train.batch_size
        transfer = self.transfer
        if transfer.finetune_min_batches * batch > MAX_FINETUNE_IMAGES:
            raise ValueError(
                f"transfer.finetune_min_batches: {transfer.finetune_min_batches} batches of "
                f"{batch} images (train.batch_size) make fine-tune epochs of "
                f"{transfer.finetune_min_batches * batch} images, more than the "
                f"{MAX_FINETUNE_IMAGES} allowed (held in memory); lower either"
            )
        return self

    @model_validator(mode="after")
    def _experiments_resolve(self) -> Params:
        for name in self.experiments:
            resolve_experiment(self, name)
        for key in ("tune", "compare"):
            chosen = getattr(self, key).experiment
            if chosen is not None and chosen not in self.experiments:
                known = ", ".join(sorted(self.experiments)) or "none defined"
                raise ValueError(
                    f"{key}.experiment: '{chosen}' is not in experiments ({known}); "
                    "use null for the base config"
                )
        for optimizer in self.compare.optimizers:
            resolve_compare(self, optimizer)
        return self

    def base_run(self) -> RunConfig:
        return RunConfig.model_validate(
            {section: getattr(self, section) for section in RUN_SECTIONS}
        )


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _raw_run_dict(config: RunConfig) -> dict[str, Any]:
    """A run config as plain data, with the knob defaults of its variants removed so that
    overrides switching optimizer/schedule do not inherit them."""
    raw = config.model_dump(mode="json")
    for section, table in (("optim", OPTIMIZER_KNOBS), ("schedule", SCHEDULE_KNOBS)):
        for knobs in table.values():
            for key in knobs:
                raw[section].pop(key, None)
    return raw


def resolve_experiment(params: Params, name: str | None) -> RunConfig:
    """The run config of experiment ``name`` (None: the base config itself)."""
    if name is None:
        return params.base_run()
    if name not in params.experiments:
        known = ", ".join(sorted(params.experiments)) or "none defined"
        raise ConfigError(f"experiment '{name}' is not in params.yaml experiments ({known})")
    overrides = params.experiments[name]
    if "data" in overrides:
        raise ConfigError(
            f"experiments.{name}.data: experiments share the prepared data; "
            "change data.* at the top level instead"
        )
    return apply_overrides(params.base_run(), overrides, prefix=f"experiments.{name}")


def resolve_transfer(params: Params) -> RunConfig:
    """The run config of the transfer stages: the base config with transfer.overrides."""
    return apply_overrides(params.base_run(), params.transfer.overrides, "transfer.overrides")


def resolve_compare(params: Params, optimizer: str) -> RunConfig:
    """The run config of ``optimizer``'s default runs in the compare pipeline: the network,
    data and training of compare.experiment (null: the base config) with the optimizer at
    KERAS_DEFAULTS and a constant rate, at most compare.epochs epochs, fitted on the train
    split (the trials' and the tuned runs' too), one network per seed, logged to
    compare.mlflow_experiment. The studies search from here."""
    compare = params.compare
    changes = {
        "optim": {"name": optimizer, **KERAS_DEFAULTS[optimizer]},
        "schedule": {"name": "constant"},
        "train": {"epochs": compare.epochs, "fit_on": "train", "ensemble": 1},
        "mlflow": {"experiment": compare.mlflow_experiment},
    }
    return apply_overrides(resolve_experiment(params, compare.experiment), changes, "compare")


def apply_overrides(config: RunConfig, overrides: dict[str, Any], prefix: str = "") -> RunConfig:
    """``config`` with nested ``overrides`` (params.yaml's shape) applied and validated.

    Overrides that name a new optimizer/schedule get that variant's defaults, not the
    old variant's knobs; overrides that keep the name keep its knobs. Problems are one-line
    ConfigErrors whose key paths start with ``prefix``.
    """
    base = _raw_run_dict(config)
    for section in ("optim", "schedule"):
        section_overrides = overrides.get(section, {})
        if isinstance(section_overrides, dict) and "name" not in section_overrides:
            base[section] = getattr(config, section).model_dump(mode="json")
    merged = _deep_merge(base, overrides)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig, prefix)) from None


def config_hash(config: BaseModel, length: int = 12) -> str:
    """A short stable hash of a resolved config (for checkpoint keys and study names)."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
