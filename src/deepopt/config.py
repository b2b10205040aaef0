"""The one typed, validated configuration, loaded once from ``params.yaml``.

This schema is the single source of defaults. Every model is frozen and refuses unknown
keys; ``load_params`` turns any problem into a one-line ``ConfigError`` that names the key
path, the bad value and what is allowed.

Optimizer and schedule knobs are optional fields: a knob that does not apply to the chosen
optimizer/schedule is an error, and the knobs that do apply get their defaults filled in
here (``OPTIMIZER_KNOBS``/``SCHEDULE_KNOBS``), so the resolved config shows every value used.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deepopt.errors import ConfigError

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "STORAGE_SCHEMES",
    "TORCHVISION_PREFIX",
    "TRANSFER_MODES",
    "DataConfig",
    "EarlyStopConfig",
    "MatrixConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "Params",
    "RunConfig",
    "ScheduleConfig",
    "SearchRange",
    "TrainConfig",
    "TransferConfig",
    "TransferTask",
    "TuneConfig",
    "TuneSpace",
    "apply_overrides",
    "check_storage_url",
    "config_hash",
    "load_overrides",
    "load_params",
    "parse_params",
    "resnet_blocks",
    "resolve_experiment",
    "resolve_transfer",
    "torchvision_weights_name",
]

DatasetName = Literal["mnist", "fashion-mnist", "kmnist", "cifar10"]
Activation = Literal["relu", "sigmoid", "tanh"]
OptimizerName = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
ScheduleName = Literal["constant", "linear", "inverse_time", "plateau", "step", "cosine"]
MonitorName = Literal["val_loss", "val_acc"]

DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
MODEL_NAMES = ("lecture_cnn", "mlp", "resnet")  # and torchvision:<name>
TORCHVISION_PREFIX = "torchvision:"
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    name: DatasetName = "fashion-mnist"
    # Folder holding <name>/ with the four IDX files (.gz or not); relative to the repo.
    root: str = "data/raw"
    # Seeded, stratified subset of the 60,000 training images; null = all of them.
    train_subset: int | None = Field(6000, ge=20)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)


def resnet_blocks(depth: int) -> int:
    """Residual blocks per stage of a ``depth``-layer ResNet: depth = 6 n + 2 (He et al.)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{depth} is not 6n+2 as resnet needs: 8, 14, 20, 26, 32 and so on")
    return (depth - 2) // 6


def torchvision_weights_name(weights: str) -> bool:
    """True when ``weights`` names torchvision weights (DEFAULT, IMAGENET1K_V1: upper-case
    identifiers, downloaded through torch.hub) rather than a path to a local file."""
    return weights.isidentifier() and weights.isupper()


def _check_torchvision_arch(arch: str) -> None:
    """Refuse names that are not torchvision classification models (imports torchvision:
    only configs that name such a model pay for it)."""
    import torchvision.models  # lazy: config import stays light

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f" (did you mean '{TORCHVISION_PREFIX}{close[0]}'?)" if close else ""
        raise ValueError(
            f"'{TORCHVISION_PREFIX}{arch}' is not a torchvision classification model{hint}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )


class ModelConfig(_Strict):
    # lecture_cnn | mlp | resnet | torchvision:<name> (any torchvision classification model)
    name: str = "lecture_cnn"
    batchnorm: bool = True
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each hidden block
    # keras: Glorot-uniform weights and zero biases, the defaults of the lecture's Keras
    # layers; torch: PyTorch's defaults (Kaiming-uniform with a=sqrt(5)).
    init: Literal["keras", "torch"] = "keras"
    # lecture_cnn: channels of the three 5x5 convolutions and units of the hidden dense layer.
    conv_channels: tuple[int, int, int] = (10, 40, 80)
    dense_units: int = Field(50, ge=1)
    # mlp: number of hidden layers and their width; resnet: weight layers, 6n+2 (8, 14, 20).
    depth: int = Field(8, ge=1)
    width: int = Field(128, ge=1)
    # resnet: channels of the first stage (x2, x4 in the next two), and whether its blocks
    # have the identity shortcut (false: the same layers as a plain stack).
    base_channels: int = Field(16, ge=1)
    skip: bool = True
    # Start from these weights instead of random ones: a local state-dict file (loaded with
    # weights_only=True), or for torchvision:<name> one of its torchvision weights
    # (DEFAULT, IMAGENET1K_V1, ...: a torch.hub download, cached). null = random init.
    weights: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value in MODEL_NAMES:
            return value
        if value.startswith(TORCHVISION_PREFIX) and value != TORCHVISION_PREFIX:
            _check_torchvision_arch(value.removeprefix(TORCHVISION_PREFIX))
            return value
        close = difflib.get_close_matches(value, MODEL_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"allowed: {', '.join(MODEL_NAMES)}, {TORCHVISION_PREFIX}<name> (got {value!r}){hint}"
        )

    @field_validator("depth")
    @classmethod
    def _depth(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("name") == "resnet":
            resnet_blocks(value)
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("name")
        if value is None or name is None:  # no weights, or the name already failed
            return value
        if not value.strip():
            raise ValueError("empty; use null for random weights or give a file path")
        if torchvision_weights_name(value) and not name.startswith(TORCHVISION_PREFIX):
            raise ValueError(
                f"{value!r} names torchvision weights, which only {TORCHVISION_PREFIX}<name> "
                f"models have; {name} takes a path to a state-dict file"
            )
        return value


# Knobs each optimizer takes beyond lr and weight_decay, with their defaults (torch's,
# except momentum, whose default is the lecture's 0.9).
OPTIMIZER_KNOBS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9},
    "adagrad": {"eps": 1e-10},
    "rmsprop": {"rho": 0.99, "eps": 1e-8, "momentum": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
}


def _check_knobs(
    section: str, chosen: str, values: dict[str, Any], table: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Refuse knobs the chosen variant lacks; fill in defaults of the ones it takes."""
    knobs = table.get(chosen)
    if knobs is None:  # an unknown name: let the Literal field report it
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


class OptimConfig(_Strict):
    name: OptimizerName = "nesterov"
    lr: float = Field(0.02, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)  # L2 penalty, as torch.optim applies it
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    betas: tuple[float, float] | None = None  # adam/adamw: the lecture's rho1, rho2
    eps: float | None = Field(None, gt=0.0)  # the lecture's delta
    rho: float | None = Field(None, gt=0.0, lt=1.0)  # rmsprop decay (torch's alpha)

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
        return self


# Knobs of each schedule, with their defaults. None means "derived at build time":
# linear's horizon defaults to train.epochs.
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
    # epoch at lr 0).
    "cosine": {"warmup_epochs": 0, "min_lr": None},
}


class ScheduleConfig(_Strict):
    name: ScheduleName = "constant"
    final_lr: float | None = Field(None, gt=0.0)  # linear: eta_T
    horizon: int | None = Field(None, ge=1)  # linear: T in epochs (null = train.epochs)
    decay: float | None = Field(None, gt=0.0, lt=1.0)  # inverse_time: delta per batch
    monitor: MonitorName | None = None  # plateau
    factor: float | None = Field(None, gt=0.0, lt=1.0)  # plateau
    patience: int | None = Field(None, ge=0)  # plateau, epochs
    min_delta: float | None = Field(None, ge=0.0)  # plateau, absolute as in Keras
    cooldown: int | None = Field(None, ge=0)  # plateau, epochs
    min_lr: float | None = Field(None, ge=0.0)  # plateau and cosine floor
    step_size: int | None = Field(None, ge=1)  # step, epochs
    gamma: float | None = Field(None, gt=0.0, le=1.0)  # step
    warmup_epochs: int | None = Field(None, ge=0)  # cosine: linear warmup from ~0

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


class EarlyStopConfig(_Strict):
    enabled: bool = True
    monitor: MonitorName = "val_loss"
    min_delta: float = Field(1e-4, ge=0.0)  # absolute, as Keras
    patience: int = Field(5, ge=0)  # epochs without improvement before stopping
    mode: Literal["auto", "min", "max"] = "auto"  # auto: min for val_loss, max for val_acc
    restore_best: bool = False  # the lecture keeps the last weights


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(50, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; null = all cores
    # bf16: CPU autocast to bfloat16 (AMX/AVX512-BF16 kernels): ~1.7x faster epochs here,
    # test accuracy as fp32's (benchmarks/bench_train.py); needs a CPU with bf16 support.
    precision: Literal["fp32", "bf16"] = "fp32"
    ensemble: int = Field(1, ge=1)  # members trained with seeds seed, seed+1, ...
    # Opt-in diagnostics from the lecture: per-layer gradient norms (vanishing gradients)
    # and the fraction of zero ReLU outputs per layer (sparsity).
    diagnostics: bool = False
    checkpoint_dir: str = "checkpoints"  # outside every DVC out, so repro never deletes it
    # train+val: the final fit of a tuned config also learns from the validation split
    # (its val_* metrics are then not held out; the test split still is).
    fit_on: Literal["train", "train+val"] = "train"
    # Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) instead of
    # each process's shard. batch_size is per process; the global batch is N x batch_size.
    sync_batchnorm: bool = False


class MlflowConfig(_Strict):
    experiment: str = Field("deepopt", min_length=1)
    log_model: bool = True  # mlflow.pytorch.log_model at the end of each run


class MatrixConfig(_Strict):
    seeds: int = Field(1, ge=1)  # every experiment repeated over seed, seed+1, ...


class SearchRange(_Strict):
    """A searched number: uniform in [low, high]; log-uniform with ``log``; ``step`` a grid."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


# The SQLAlchemy dialects Optuna's RDBStorage takes (optionally with +driver), and journal:
# a JournalFileBackend log file (journal:///relative.log, journal:////absolute.log).
SQL_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
STORAGE_SCHEMES: tuple[str, ...] = (*SQL_DIALECTS, "journal")


def check_storage_url(url: str, key: str = "tune.storage") -> str:
    """The URL's scheme (without +driver) if deepopt can open it; ValueError naming ``key``."""
    scheme, sep, rest = url.partition("://")
    dialect = scheme.split("+", 1)[0].lower()
    if not sep or dialect not in STORAGE_SCHEMES or (dialect == "journal" and scheme != dialect):
        raise ValueError(
            f"{key}: {url!r} has an unknown scheme '{scheme}'; allowed: "
            f"{', '.join(SQL_DIALECTS)} (SQLAlchemy URLs, e.g. sqlite:///optuna.db) "
            "or journal (journal:///FILE.log)"
        )
    if dialect in ("sqlite", "journal") and not rest.lstrip("/"):
        raise ValueError(f"{key}: {url!r} names no file; e.g. {dialect}:///optuna.db")
    return dialect


def _int_field(model: type[BaseModel], key: str) -> bool:
    return int in get_args(model.model_fields[key].annotation)


def _searchable_knobs(schedule: str) -> list[str]:
    """The numeric knobs of a schedule (plateau's monitor is not a number to search)."""
    return [
        key
        for key in SCHEDULE_KNOBS[schedule]
        if {int, float} & set(get_args(ScheduleConfig.model_fields[key].annotation))
    ]


def _check_range(
    path: str, bounds: SearchRange, model: type[BaseModel], key: str, fixed: dict[str, Any]
) -> None:
    """Both ends of a range must be values the target field accepts."""
    if not bounds.low < bounds.high:
        raise ValueError(f"{path}: low {bounds.low:g} must be < high {bounds.high:g}")
    if bounds.log and bounds.low <= 0:
        raise ValueError(f"{path}: a log range needs low > 0, got low {bounds.low:g}")
    if bounds.step is not None and (bounds.log or bounds.step <= 0):
        raise ValueError(f"{path}: step must be > 0 and cannot be combined with log")
    section = "optim" if model is OptimConfig else "schedule"
    for end, value in (("low", bounds.low), ("high", bounds.high), ("step", bounds.step)):
        if value is None:
            continue
        if _int_field(model, key) and value != int(value):
            raise ValueError(f"{path}: {end} {value:g} must be a whole number ({section}.{key})")
        if end == "step":
            continue
        try:
            model.model_validate({**fixed, key: value})
        except ValidationError as err:
            reason = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
            raise ValueError(
                f"{path}: {end} {value:g} is not a valid {section}.{key} ({reason})"
            ) from None


class TuneSpace(_Strict):
    """The search space. A schedule's knobs are searched only when that schedule is drawn."""

    lr: SearchRange = SearchRange(low=0.005, high=0.2, log=True)
    # Searched when the drawn optimizer takes momentum (momentum, nesterov, rmsprop).
    momentum: SearchRange | None = SearchRange(low=0.5, high=0.98)
    # true: draw optim.name from momentum | nesterov (when `optimizer` is not searched).
    nesterov: bool = True
    optimizer: list[OptimizerName] | None = Field(None, min_length=1)
    weight_decay: SearchRange | None = None
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
        if self.weight_decay is not None:
            _check_range(
                f"{where}.weight_decay", self.weight_decay, OptimConfig, "weight_decay", {}
            )
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
            allowed = _searchable_knobs(name)
            for key, bounds in knobs.items():
                path = f"{where}.schedule.{name}.{key}"
                if key not in allowed:
                    raise ValueError(
                        f"{path}: not a searchable knob of schedule '{name}'; allowed: "
                        f"{', '.join(allowed) or 'none'}"
                    )
                _check_range(path, bounds, ScheduleConfig, key, {"name": name})
        return self


class TuneConfig(_Strict):
    """The ``tune`` stage: an Optuna study over ``space`` starting from one experiment."""

    experiment: str | None = None  # an entry of experiments to start from; null = the base
    # Finished (complete + pruned) trials the study should hold; a resumed study runs the rest.
    n_trials: int = Field(30, ge=1)
    epochs: int = Field(15, ge=1)  # per trial (train.epochs of the trials)
    timeout: float | None = Field(None, gt=0.0)  # seconds per session; null = no limit
    # Worker processes sharing the study, each with cores/workers torch threads.
    workers: int = Field(2, ge=1)
    storage: str = "sqlite:///optuna.db"  # relative paths: from the folder deepopt runs in
    study_name: str | None = None  # null: <experiment>-<hash of space, data and config>
    sampler_seed: int | None = None  # null = seed
    startup_trials: int = Field(10, ge=0)  # random trials before TPE models the results
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(5, ge=0)  # median: trials finished before it prunes
    pruner_warmup_epochs: int = Field(3, ge=0)  # median: epochs never pruned; hyperband: min
    precision: Literal["fp32", "bf16"] | None = None  # of the trials; null = train.precision
    # Seconds between a running trial's heartbeats (SQL storages), and without one for
    # heartbeat_grace seconds the trial is failed and queued again.
    heartbeat_interval: int = Field(5, ge=1)
    heartbeat_grace: int = Field(20, ge=2)
    final_fit: Literal["train", "train+val"] = "train"  # what train_best learns from
    space: TuneSpace = TuneSpace()

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
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


TransferMode = Literal["linear_probe", "finetune", "scratch"]
TRANSFER_MODES: tuple[str, ...] = get_args(TransferMode)


class TransferTask(_Strict):
    """A classification task made of some classes of a data set (relabelled 0, 1, ...)."""

    dataset: DatasetName = "fashion-mnist"
    classes: tuple[int, ...] = Field(min_length=2)

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value) or not all(0 <= c <= 9 for c in value):
            raise ValueError(f"{list(value)} must be distinct class indices in 0 to 9")
        return value


class TransferConfig(_Strict):
    """The transfer pipeline (transfer/dvc.yaml): pretrain on ``source``, then fine-tune on
    ``target`` with few labelled images per class, in each of ``modes``."""

    source: TransferTask = TransferTask(classes=(0, 1, 2, 3, 4))
    target: TransferTask = TransferTask(classes=(5, 6, 7, 8, 9))
    # Training images per source class (from its training file); null = all of them.
    source_per_class: int | None = Field(2000, ge=1)
    # Held out of the training files, per class, for validation (source and target alike).
    val_per_class: int = Field(100, ge=1)
    # Labelled training images per target class: one fine-tune per size and mode; the
    # smaller sets are subsets of the larger ones.
    target_sizes: tuple[int, ...] = Field((2, 10, 50, 200, 1000), min_length=1)
    modes: tuple[TransferMode, ...] = Field(("linear_probe", "finetune", "scratch"), min_length=1)
    # finetune: the backbone's learning rate is optim.lr times this (1 = the same).
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    pretrain_epochs: int = Field(5, ge=1)
    finetune_epochs: int = Field(10, ge=1)  # every fine-tune, without early stopping
    # Batches per fine-tune epoch at least: a smaller training set is repeated (whole
    # copies, shuffled together) so that 10 images per class still get enough updates.
    finetune_min_batches: int = Field(30, ge=1)
    # Run-config overrides for both stages, in an experiments entry's shape (model, optim...).
    overrides: dict[str, Any] = Field(
        default_factory=lambda: {"model": {"name": "resnet", "depth": 8, "base_channels": 16}}
    )

    @model_validator(mode="after")
    def _check(self) -> TransferConfig:
        shared = set(self.source.classes) & set(self.target.classes)
        if self.source.dataset == self.target.dataset and shared:
            raise ValueError(
                f"transfer.target.classes: {sorted(shared)} are also source classes of "
                f"{self.source.dataset}; source and target classes must be disjoint"
            )
        if list(self.target_sizes) != sorted(set(self.target_sizes)) or self.target_sizes[0] < 1:
            raise ValueError(
                f"transfer.target_sizes: {list(self.target_sizes)} must be distinct positive "
                "counts in ascending order"
            )
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"transfer.modes: {list(self.modes)} lists a mode twice")
        if "data" in self.overrides:
            raise ValueError(
                "transfer.overrides.data: the data sets are transfer.source and transfer.target"
            )
        return self


class RunConfig(_Strict):
    """Everything one training run reads: the base config with an experiment applied."""

    seed: int = Field(4487, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()


_RUN_SECTIONS = tuple(RunConfig.model_fields)


class Params(RunConfig):
    """The whole of params.yaml: the base run config, the matrix of experiments and more."""

    matrix: MatrixConfig = MatrixConfig()
    # name -> overrides of the base run config (any key of the sections above but data).
    experiments: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tune: TuneConfig = TuneConfig()
    transfer: TransferConfig = TransferConfig()

    @model_validator(mode="after")
    def _transfer_resolves(self) -> Params:
        resolve_transfer(self)
        return self

    @model_validator(mode="after")
    def _experiments_resolve(self) -> Params:
        for name in self.experiments:
            resolve_experiment(self, name)
        if self.tune.experiment is not None and self.tune.experiment not in self.experiments:
            known = ", ".join(sorted(self.experiments)) or "none defined"
            raise ValueError(
                f"tune.experiment: '{self.tune.experiment}' is not in experiments ({known}); "
                "use null for the base config"
            )
        return self

    def base_run(self) -> RunConfig:
        return RunConfig.model_validate(
            {section: getattr(self, section) for section in _RUN_SECTIONS}
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
        raise ConfigError(_format_validation_error(err, RunConfig, prefix)) from None


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML file of run-config overrides (e.g. params/best.yaml); one-line ConfigErrors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: overrides file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {' '.join(str(err).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if "data" in raw:
        raise ConfigError(f"{path}: data: overrides share the prepared data; change data.* instead")
    return raw


def config_hash(config: BaseModel, length: int = 12) -> str:
    """A short stable hash of a resolved config (for checkpoint keys and study names)."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *get_args(annotation)]
        nested = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nested is None:
            return None
        model = nested
    return model


def _format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        key = str(loc[-1])
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        allowed = expected.replace("'", "").replace(" or ", ", ")
        return f"{path}: {value!r} is not one of {allowed}"
    if kind == "value_error":
        # Our own validators already name the key path in their message.
        message = str(first["msg"]).removeprefix("Value error, ")
        return message if "." in message.split(":")[0] else f"{path}: {message}"
    if kind == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {value!r} is invalid: {first['msg']}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate already-parsed YAML data into Params (ConfigError on any problem)."""
    if raw is None:
        raise ConfigError(
            f"{source}: file is empty; expected a mapping with keys such as "
            f"{', '.join(_RUN_SECTIONS)}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_validation_error(err, Params)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the repository root)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}YAML syntax error: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None
    return parse_params(raw, source=str(path))
