"""The ``compare`` section's schema (compare/dvc.yaml): which optimizers, the tuning budget
each gets, the seeds, and what each study searches. ``KERAS_DEFAULTS`` are the one-shot
runs' settings, the defaults the lecture ran Keras' optimizers with."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import Field, ValidationError, field_validator, model_validator

from deepopt.config.knobs import OPTIMIZER_NAMES, OptimizerName, Strict
from deepopt.config.limits import MAX_EPOCHS, MAX_REPLICAS, MAX_TRIALS, MAX_WORKERS
from deepopt.config.names import check_experiment_name, check_name
from deepopt.config.tune import SearchRange, TuneSpace, check_storage_url

__all__ = ["KERAS_DEFAULTS", "CompareConfig", "CompareSpace"]

# What each optimizer runs with when nobody tunes it: Keras 3's default learning rates
# (SGD 0.01; Adagrad, RMSprop, Adam, AdamW 0.001; AdamW's weight_decay 0.004), on top of
# the knob defaults in config.knobs (Keras' rho, epsilons, betas; momentum 0.9, the lecture's,
# for the momentum and nesterov variants, which Keras has no default for), constant rate.
# weight_decay is set for every one: else the base config's (or compare.experiment's) L2
# penalty would carry over into "the defaults".
KERAS_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01, "weight_decay": 0.0},
    "momentum": {"lr": 0.01, "weight_decay": 0.0},
    "nesterov": {"lr": 0.01, "weight_decay": 0.0},
    "adagrad": {"lr": 0.001, "weight_decay": 0.0},
    "rmsprop": {"lr": 0.001, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "weight_decay": 0.004},
}


def _default_schedules() -> dict[str, dict[str, SearchRange]]:
    schedule = TuneSpace().schedule
    assert schedule is not None
    return schedule


class CompareSpace(Strict):
    """What every optimizer's study searches: its learning rate, its own knobs (each only
    for the optimizers that take it) and the schedule, the same ranges for all."""

    # Wide: the optimizers' good rates lie three decades apart (DeepOBS searches 1e-5..1e2).
    lr: SearchRange = SearchRange(low=1e-4, high=1.0, log=True)
    momentum: SearchRange = SearchRange(low=0.5, high=0.99)  # momentum, nesterov
    rho: SearchRange = SearchRange(low=0.8, high=0.999)  # rmsprop
    beta1: SearchRange = SearchRange(low=0.8, high=0.99)  # adam, adamw
    beta2: SearchRange = SearchRange(low=0.99, high=0.9999)  # adam, adamw
    # adamw's decoupled decay is its own knob; null = keep KERAS_DEFAULTS' 0.004.
    weight_decay: SearchRange | None = SearchRange(low=1e-5, high=1e-1, log=True)
    schedule: dict[str, dict[str, SearchRange]] | None = Field(default_factory=_default_schedules)

    def tune_space(self, optimizer: str) -> TuneSpace:
        """The study space of ``optimizer``: the knobs it takes, nothing it lacks (RMSprop's
        own knob is rho; its momentum stays Keras' 0)."""
        return TuneSpace(
            lr=self.lr,
            momentum=self.momentum if optimizer in ("momentum", "nesterov") else None,
            nesterov=False,  # the optimizer is fixed: each has its own study
            optimizer=None,
            rho=self.rho if optimizer == "rmsprop" else None,
            beta1=self.beta1 if optimizer in ("adam", "adamw") else None,
            beta2=self.beta2 if optimizer in ("adam", "adamw") else None,
            weight_decay=self.weight_decay if optimizer == "adamw" else None,
            schedule=self.schedule,
        )

    @model_validator(mode="after")
    def _spaces(self) -> CompareSpace:
        if self.momentum.low <= 0.0:  # nesterov's torch.optim.SGD refuses momentum 0
            raise ValueError(
                f"compare.space.momentum: low {self.momentum.low:g} could draw momentum 0 "
                "for nesterov, which needs momentum > 0; use low > 0"
            )
        for optimizer in OPTIMIZER_NAMES:  # every range checked the way a tune space is
            try:
                self.tune_space(optimizer)
            except ValidationError as err:
                message = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
                raise ValueError(message.replace("tune.space", "compare.space")) from None
        return self


class CompareConfig(Strict):
    """The compare pipeline: every optimizer at its defaults, tuned with the same budget,
    and both over the same seeds. The studies take tune's sampler, pruner and heartbeat
    settings; with tune.startup_trials >= budget (the defaults) every trial is random, the
    protocol of Schmidt et al. 2021."""

    optimizers: list[OptimizerName] = Field(
        default_factory=lambda: list(get_args(OptimizerName)), min_length=2
    )
    experiment: str | None = None  # the network and data: an entry of experiments; null = base
    budget: int = Field(8, ge=1, le=MAX_TRIALS)  # finished trials of every study
    epochs: int = Field(8, ge=1, le=MAX_EPOCHS)  # the cap of every run: default, trial, tuned
    seeds: int = Field(5, ge=2, le=MAX_REPLICAS)  # of the default and the tuned runs
    target_val_acc: float = Field(0.85, gt=0.0, lt=1.0)  # the performance profile's target
    storage: str = "sqlite:///compare/optuna.db"
    workers: int = Field(2, ge=1, le=MAX_WORKERS)  # processes per study
    mlflow_experiment: str = "deepopt-compare"
    space: CompareSpace = CompareSpace()

    @field_validator("optimizers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"compare.optimizers: {', '.join(repeated)} listed twice")
        return value

    @field_validator("experiment", mode="before")
    @classmethod
    def _experiment_name(cls, value: Any) -> Any:
        return value if value is None else check_experiment_name(value, "compare.experiment")

    @field_validator("mlflow_experiment", mode="before")
    @classmethod
    def _mlflow_name(cls, value: Any) -> Any:
        return check_name(value, "compare.mlflow_experiment")

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        check_storage_url(self.storage, "compare.storage")
        warmup = (self.space.schedule or {}).get("cosine", {}).get("warmup_epochs")
        if warmup is not None and warmup.high >= self.epochs:
            raise ValueError(
                f"compare.space.schedule.cosine.warmup_epochs: high {warmup.high:g} must be "
                f"less than compare.epochs ({self.epochs}) so the cosine phase has an epoch"
            )
        return self
