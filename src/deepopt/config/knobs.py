"""The optimizer and schedule sections of the run config and their knobs' tables (the
single source of each variant's defaults), and ``Strict``, the base of every section."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepopt.config.limits import (
    MAX_EPOCHS,
    MAX_EPS,
    MAX_INITIAL_ACCUMULATOR,
    MAX_LR,
    MAX_MIN_DELTA,
    MAX_WEIGHT_DECAY,
)

__all__ = [
    "OPTIMIZER_KNOBS",
    "OPTIMIZER_NAMES",
    "SCHEDULE_KNOBS",
    "SCHEDULE_NAMES",
    "MonitorName",
    "OptimConfig",
    "OptimizerName",
    "ScheduleConfig",
    "ScheduleName",
    "Strict",
    "check_cosine_warmup",
]

OptimizerName = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
ScheduleName = Literal["constant", "linear", "inverse_time", "plateau", "step", "cosine"]
MonitorName = Literal["val_loss", "val_acc"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)


class Strict(BaseModel):
    """Frozen, refuses unknown keys, NaN and infinities: the base of every config section."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Optimizer and schedule knobs are optional fields: a knob that does not apply to the
# chosen optimizer/schedule is an error, and the knobs that do apply get their defaults
# from these tables when the config is validated, so the resolved config shows every value
# used and deepopt.optim reads them as they are.

# Knobs each optimizer takes beyond lr and weight_decay, with their defaults: Keras' (the
# lecture ran Keras' optimizers with their defaults), except momentum, whose default is the
# lecture's 0.9. PyTorch's differ: RMSprop alpha 0.99 and eps 1e-8, Adagrad
# initial_accumulator_value 0 and eps 1e-10, Adam/AdamW eps 1e-8 placed after the bias
# correction. Where torch's update formula itself differs from Keras', deepopt.optim says so.
OPTIMIZER_KNOBS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9},
    "adagrad": {"eps": 1e-7, "initial_accumulator": 0.1},
    "rmsprop": {"rho": 0.9, "eps": 1e-7, "momentum": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-7, "eps_placement": "keras"},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-7, "eps_placement": "keras"},
}


def _check_knobs(
    section: str, chosen: str, values: dict[str, Any], table: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Refuse knobs the chosen variant lacks; fill in defaults of the ones it takes."""
    knobs = table.get(chosen) if isinstance(chosen, str) else None
    if knobs is None:  # an unknown name or not a name: let the Literal field report it
        return values
    all_knobs = {k for variant in table.values() for k in variant}
    for key, value in values.items():
        if key in all_knobs and key not in knobs and value is not None:
            allowed = ", ".join(sorted(knobs)) or "none"
            raise ValueError(
                f"{section}.{key}: does not apply to {section}.name '{chosen}' "
                f"(its knobs: {allowed}); remove it or set it to null"
            )
    filled = dict(values)
    for key, default in knobs.items():
        if filled.get(key) is None:
            filled[key] = default
    return filled


class OptimConfig(Strict):
    name: OptimizerName = "nesterov"
    lr: float = Field(0.02, gt=0.0, le=MAX_LR)
    # L2 penalty, as torch.optim applies it.
    weight_decay: float = Field(0.0, ge=0.0, le=MAX_WEIGHT_DECAY)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    betas: tuple[float, float] | None = None  # adam/adamw: the lecture's rho1, rho2
    eps: float | None = Field(None, gt=0.0, le=MAX_EPS)  # the lecture's delta
    rho: float | None = Field(None, gt=0.0, lt=1.0)  # rmsprop decay (torch's alpha)
    # adagrad: the accumulator of squared gradients starts here (Keras'
    # initial_accumulator_value, torch's initial_accumulator_value).
    initial_accumulator: float | None = Field(None, ge=0.0, le=MAX_INITIAL_ACCUMULATOR)
    # adam/adamw: keras adds eps to sqrt(v) before the bias correction ("epsilon hat",
    # Keras and TensorFlow); torch adds it to sqrt(v / (1 - beta2^t)), after: early in
    # training, when 1 - beta2^t is small, Keras' eps is effectively up to 1/sqrt(1 - beta2)
    # ~ 32 times larger.
    eps_placement: Literal["keras", "torch"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _knobs(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return _check_knobs("optim", values.get("name", "nesterov"), values, OPTIMIZER_KNOBS)

    @model_validator(mode="after")
    def _ranges(self) -> OptimConfig:
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas: {list(self.betas)} must both be in [0, 1)")
        if self.name == "nesterov" and self.momentum == 0.0:  # torch.optim.SGD refuses it
            raise ValueError(
                "optim.momentum: 0.0 is not allowed with nesterov (it needs momentum > 0); "
                "use momentum in (0, 1) or optim.name sgd"
            )
        return self


# Knobs of each schedule, with their defaults. None means "derived when built" by the
# schedule's builder in deepopt.optim: linear's horizon is then train.epochs. (Not here:
# the resolved config is what MLflow logs and config_hash keys, and they log null.)
SCHEDULE_KNOBS: dict[str, dict[str, Any]] = {
    "constant": {},
    "linear": {"final_lr": 1e-4, "horizon": None},  # the lecture's sc: 0.02 -> 0.0001
    "inverse_time": {"decay": 1e-5},  # per batch, as Keras' decay
    "plateau": {
        "monitor": "val_loss",
        "factor": 0.1,
        "patience": 5,
        "min_delta": 1e-4,
        "cooldown": 0,
        "min_lr": 0.0,
    },
    "step": {"step_size": 10, "gamma": 0.1},
    # min_lr None: 1 % of optim.lr, derived when built (a floor of 0 would train the last
    # epoch at lr 0). warmup_epochs must be less than train.epochs (RunConfig checks).
    "cosine": {"warmup_epochs": 0, "min_lr": None},
}


class ScheduleConfig(Strict):
    name: ScheduleName = "constant"
    final_lr: float | None = Field(None, gt=0.0, le=MAX_LR)  # linear: eta_T
    # linear: T in epochs (null = train.epochs)
    horizon: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    decay: float | None = Field(None, gt=0.0, lt=1.0)  # inverse_time: delta per batch
    monitor: MonitorName | None = None  # plateau
    factor: float | None = Field(None, gt=0.0, lt=1.0)  # plateau
    patience: int | None = Field(None, ge=0, le=MAX_EPOCHS)  # plateau, epochs
    min_delta: float | None = Field(None, ge=0.0, le=MAX_MIN_DELTA)  # plateau, absolute as in Keras
    cooldown: int | None = Field(None, ge=0, le=MAX_EPOCHS)  # plateau, epochs
    min_lr: float | None = Field(None, ge=0.0, le=MAX_LR)  # plateau and cosine floor
    step_size: int | None = Field(None, ge=1, le=MAX_EPOCHS)  # step, epochs
    gamma: float | None = Field(None, gt=0.0, le=1.0)  # step
    warmup_epochs: int | None = Field(None, ge=0, le=MAX_EPOCHS)  # cosine: linear warmup from ~0

    @model_validator(mode="before")
    @classmethod
    def _knobs(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return _check_knobs("schedule", values.get("name", "constant"), values, SCHEDULE_KNOBS)

    @model_validator(mode="after")
    def _positive_cosine_floor(self) -> ScheduleConfig:
        if self.name == "cosine" and self.min_lr == 0.0:
            raise ValueError(
                "schedule.min_lr: 0 would train cosine's last epoch at lr 0; give a positive "
                "floor, or null for 1 % of optim.lr"
            )
        return self


def check_cosine_warmup(warmup_epochs: int, epochs: int) -> None:
    """ValueError unless cosine keeps at least one epoch after its ``warmup_epochs``."""
    if warmup_epochs >= epochs:
        raise ValueError(
            f"schedule.warmup_epochs: {warmup_epochs} must be less than train.epochs "
            f"({epochs}) so the cosine phase has at least one epoch"
        )
