"""The ``tune`` section's schema: the search space (``TuneSpace``), the study settings
(``TuneConfig``) and the storage URLs deepopt can open (``check_storage_url``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from deepopt.config.limits import (
    MAX_EPOCHS,
    MAX_HEARTBEAT,
    MAX_HEARTBEAT_GRACE,
    MAX_SEED,
    MAX_TIMEOUT,
    MAX_TRIALS,
    MAX_WORKERS,
)
from deepopt.config.names import DERIVED_SUFFIX, MAX_NAME_LENGTH, check_experiment_name, check_name
from deepopt.config.run import (
    SCHEDULE_KNOBS,
    SCHEDULE_NAMES,
    OptimConfig,
    OptimizerName,
    ScheduleConfig,
    Strict,
)
from deepopt.errors import one_line

__all__ = [
    "SQL_DIALECTS",
    "STORAGE_SCHEMES",
    "SearchRange",
    "StorageUrl",
    "TuneConfig",
    "TuneSpace",
    "check_storage_url",
    "integer_field",
    "searchable_knobs",
]


class SearchRange(Strict):
    """A searched number: uniform in [low, high]; log-uniform with ``log``; ``step`` a grid."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


# The SQLAlchemy dialects Optuna's RDBStorage takes (optionally with +driver), and journal:
# a JournalFileBackend log file (journal:///relative.log, journal:////absolute.log).
SQL_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
STORAGE_SCHEMES: tuple[str, ...] = (*SQL_DIALECTS, "journal")


@dataclass(frozen=True)
class StorageUrl:
    """A storage URL deepopt can open: its scheme and, for sqlite and journal, its file."""

    url: str
    scheme: str  # the SQLAlchemy dialect without +driver, or "journal"
    file: Path | None  # relative to the folder deepopt runs in; None for a database server


def check_storage_url(url: str, key: str = "tune.storage") -> StorageUrl:
    """``url`` checked and split, the one parser of every storage URL (``tune.storage``,
    ``--storage``); a ValueError naming ``key`` and what is allowed if deepopt cannot open it."""
    scheme, sep, rest = url.partition("://")
    dialect = scheme.split("+", 1)[0].lower()
    if not sep or dialect not in STORAGE_SCHEMES or (dialect == "journal" and scheme != dialect):
        raise ValueError(
            f"{key}: {url!r} has an unknown scheme '{scheme}'; allowed: "
            f"{', '.join(SQL_DIALECTS)} (SQLAlchemy URLs, e.g. sqlite:///optuna.db) "
            "or journal (journal:///FILE.log)"
        )
    if dialect not in ("sqlite", "journal"):
        return StorageUrl(url, dialect, None)
    # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's rule; journal alike).
    if not rest.startswith("/") or not rest.lstrip("/"):
        raise ValueError(f"{key}: {url!r} names no file; e.g. {dialect}:///optuna.db")
    return StorageUrl(url, dialect, Path(rest[1:]))


def integer_field(model: type[BaseModel], key: str) -> bool:
    """True when field ``key`` of ``model`` takes whole numbers (a search draws integers)."""
    return int in get_args(model.model_fields[key].annotation)


def searchable_knobs(schedule: str) -> list[str]:
    """The numeric knobs of a schedule, in SCHEDULE_KNOBS order (plateau's monitor is not
    a number to search); a search space may search these and no others."""
    return [
        key
        for key in SCHEDULE_KNOBS[schedule]
        if {int, float} & set(get_args(ScheduleConfig.model_fields[key].annotation))
    ]


def _check_steps(path: str, bounds: SearchRange) -> None:
    """A grid's step: positive, not on a log scale, and at most the range's width."""
    if bounds.log and bounds.low <= 0:
        raise ValueError(f"{path}: a log range needs low > 0, got low {bounds.low:g}")
    if bounds.step is not None and (bounds.log or bounds.step <= 0):
        raise ValueError(f"{path}: step must be > 0 and cannot be combined with log")
    if bounds.step is not None and bounds.step > bounds.high - bounds.low:
        raise ValueError(
            f"{path}: step {bounds.step:g} is more than high - low "
            f"({bounds.high - bounds.low:g}); the range would hold one value"
        )


def _check_range(
    path: str, bounds: SearchRange, model: type[BaseModel], key: str, fixed: dict[str, Any]
) -> None:
    """Both ends of a range must be values the target field accepts."""
    if not bounds.low < bounds.high:
        raise ValueError(f"{path}: low {bounds.low:g} must be < high {bounds.high:g}")
    _check_steps(path, bounds)
    section = "optim" if model is OptimConfig else "schedule"
    for end, value in (("low", bounds.low), ("high", bounds.high), ("step", bounds.step)):
        if value is None:
            continue
        if integer_field(model, key) and value != int(value):
            raise ValueError(f"{path}: {end} {value:g} must be a whole number ({section}.{key})")
        if end == "step":
            continue
        try:
            model.model_validate({**fixed, key: value})
        except ValidationError as err:
            reason = one_line(str(err.errors()[0]["msg"]).removeprefix("Value error, "))
            raise ValueError(
                f"{path}: {end} {value:g} is not a valid {section}.{key} ({reason})"
            ) from None


class TuneSpace(Strict):
    """The search space. A schedule's knobs are searched only when that schedule is drawn."""

    lr: SearchRange = SearchRange(low=0.005, high=0.2, log=True)
    # Searched when the drawn optimizer takes momentum (momentum, nesterov, rmsprop).
    momentum: SearchRange | None = SearchRange(low=0.5, high=0.98)
    # true: draw optim.name from momentum | nesterov (when `optimizer` is not searched).
    nesterov: bool = True
    optimizer: list[OptimizerName] | None = Field(None, min_length=1)
    weight_decay: SearchRange | None = None
    # Searched when the drawn optimizer takes them: rmsprop's rho, adam/adamw's betas (one of
    # the two betas searched alone keeps the other's default, config.knobs').
    rho: SearchRange | None = None
    beta1: SearchRange | None = None
    beta2: SearchRange | None = None
    # schedule name -> its knobs to search ({} = the knobs' defaults); null = keep schedule.*.
    schedule: dict[str, dict[str, SearchRange]] | None = Field(
        default_factory=lambda: {
            "constant": {},
            "linear": {"final_lr": SearchRange(low=1e-5, high=5e-3, log=True)},
            "inverse_time": {"decay": SearchRange(low=1e-5, high=1e-2, log=True)},
            "plateau": {
                "factor": SearchRange(low=0.1, high=0.5),
                "patience": SearchRange(low=1, high=4),
            },
            "cosine": {"warmup_epochs": SearchRange(low=0, high=2)},
        }
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneSpace:
        where = "tune.space"
        _check_range(f"{where}.lr", self.lr, OptimConfig, "lr", {})
        if self.momentum is not None:
            fixed = {"name": "momentum"}
            _check_range(f"{where}.momentum", self.momentum, OptimConfig, "momentum", fixed)
            nesterov = self.nesterov or "nesterov" in (self.optimizer or [])
            if nesterov and self.momentum.low <= 0.0:
                raise ValueError(
                    f"{where}.momentum: low {self.momentum.low:g} could draw momentum 0 for "
                    "nesterov, which needs momentum > 0; use low > 0"
                )
        if self.weight_decay is not None:
            _check_range(
                f"{where}.weight_decay", self.weight_decay, OptimConfig, "weight_decay", {}
            )
        if self.rho is not None:
            _check_range(f"{where}.rho", self.rho, OptimConfig, "rho", {"name": "rmsprop"})
        for key in ("beta1", "beta2"):  # one entry of optim.betas each: [0, 1)
            bounds = getattr(self, key)
            if bounds is not None and not 0.0 <= bounds.low < bounds.high < 1.0:
                raise ValueError(
                    f"{where}.{key}: [{bounds.low:g}, {bounds.high:g}] must lie in [0, 1) "
                    "with low < high"
                )
            if bounds is not None:
                _check_steps(f"{where}.{key}", bounds)
        if self.optimizer is not None and self.nesterov:
            raise ValueError(
                f"{where}.nesterov: set it to false when {where}.optimizer is searched "
                "(list momentum and/or nesterov among the optimizers instead)"
            )
        if self.schedule is None:
            return self
        if not self.schedule:
            raise ValueError(f"{where}.schedule: empty; list at least one schedule or use null")
        for name, knobs in self.schedule.items():
            if name not in SCHEDULE_KNOBS:
                close = difflib.get_close_matches(name, SCHEDULE_NAMES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(
                    f"{where}.schedule.{name}: unknown schedule{hint}; allowed: "
                    f"{', '.join(SCHEDULE_NAMES)}"
                )
            allowed = searchable_knobs(name)
            for key, bounds in knobs.items():
                path = f"{where}.schedule.{name}.{key}"
                if key not in allowed:
                    raise ValueError(
                        f"{path}: not a searchable knob of schedule '{name}'; allowed: "
                        f"{', '.join(allowed) or 'none'}"
                    )
                _check_range(path, bounds, ScheduleConfig, key, {"name": name})
        return self


class TuneConfig(Strict):
    """The ``tune`` stage: an Optuna study over ``space`` starting from one experiment."""

    experiment: str | None = None  # an entry of experiments to start from; null = the base
    # Finished (complete + pruned) trials the study should hold; a resumed study runs the rest.
    n_trials: int = Field(30, ge=1, le=MAX_TRIALS)
    epochs: int = Field(15, ge=1, le=MAX_EPOCHS)  # per trial (train.epochs of the trials)
    # Seconds per session; null = no limit.
    timeout: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT)
    # Worker processes sharing the study, each with cores/workers torch threads.
    workers: int = Field(2, ge=1, le=MAX_WORKERS)
    storage: str = "sqlite:///optuna.db"  # relative paths: from the folder deepopt runs in
    study_name: str | None = None  # null: <experiment>-<hash of space, data and config>
    sampler_seed: int | None = Field(None, ge=0, le=MAX_SEED)  # null = seed
    # Random trials before TPE models the results.
    startup_trials: int = Field(10, ge=0, le=MAX_TRIALS)
    pruner: Literal["median", "hyperband", "none"] = "median"
    # median: trials finished before it prunes; and epochs never pruned (hyperband: min).
    pruner_startup_trials: int = Field(5, ge=0, le=MAX_TRIALS)
    pruner_warmup_epochs: int = Field(3, ge=0, le=MAX_EPOCHS)
    precision: Literal["fp32", "bf16", "fp16"] | None = (
        None  # of the trials; null = train.precision
    )
    # Seconds between a running trial's heartbeats (SQL storages), and without one for
    # heartbeat_grace seconds the trial is failed and queued again.
    heartbeat_interval: int = Field(5, ge=1, le=MAX_HEARTBEAT)
    heartbeat_grace: int = Field(20, ge=2, le=MAX_HEARTBEAT_GRACE)
    final_fit: Literal["train", "train+val"] = "train"  # what train_best learns from
    space: TuneSpace = TuneSpace()

    @field_validator("experiment", mode="before")
    @classmethod
    def _experiment_name(cls, value: Any) -> Any:
        return value if value is None else check_experiment_name(value, "tune.experiment")

    @field_validator("study_name", mode="before")
    @classmethod
    def _study_name(cls, value: Any) -> Any:
        return value if value is None else check_name(value, "tune.study_name")

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        derived = len(self.experiment or "base") + DERIVED_SUFFIX
        if self.study_name is None and derived > MAX_NAME_LENGTH:
            raise ValueError(
                f"tune.experiment: the study name deepopt derives from it (<experiment>-<10 "
                f"hex digits>) would have {derived} characters, more than {MAX_NAME_LENGTH}; "
                "use a shorter experiment name or set tune.study_name"
            )
        check_storage_url(self.storage)
        warmup = (self.space.schedule or {}).get("cosine", {}).get("warmup_epochs")
        if warmup is not None and warmup.high >= self.epochs:
            raise ValueError(
                f"tune.space.schedule.cosine.warmup_epochs: high {warmup.high:g} must be less "
                f"than tune.epochs ({self.epochs}) so the cosine phase has at least one epoch"
            )
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(
                f"tune.heartbeat_grace: {self.heartbeat_grace} s must be more than "
                f"tune.heartbeat_interval ({self.heartbeat_interval} s)"
            )
        return self
