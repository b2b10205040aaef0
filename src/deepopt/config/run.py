"""The run config's schema by section (data, model, optim, schedule, ...) and ``RunConfig``:
the single source of defaults (the optim and schedule sections, with every optimizer's and
schedule's knobs, live in ``config.knobs`` and are re-exported here)."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from deepopt.config import limits
from deepopt.config.knobs import (
    OPTIMIZER_KNOBS,
    OPTIMIZER_NAMES,
    SCHEDULE_KNOBS,
    SCHEDULE_NAMES,
    MonitorName,
    OptimConfig,
    OptimizerName,
    ScheduleConfig,
    Strict,
    check_cosine_warmup,
)
from deepopt.config.limits import (
    MAX_BATCH,
    MAX_DEPTH,
    MAX_ENSEMBLE,
    MAX_EPOCHS,
    MAX_EPS,
    MAX_IMAGES,
    MAX_MIN_DELTA,
    MAX_REPLICAS,
    MAX_SEED,
    MAX_THREADS,
    MAX_WIDTH,
)
from deepopt.config.names import check_device_spec

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "OPTIMIZER_KNOBS",
    "OPTIMIZER_NAMES",
    "RUN_SECTIONS",
    "SCHEDULE_KNOBS",
    "SCHEDULE_NAMES",
    "TORCHVISION_PREFIX",
    "DataConfig",
    "DatasetName",
    "EarlyStopConfig",
    "MatrixConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimizerName",
    "RunConfig",
    "ScheduleConfig",
    "Strict",
    "TrainConfig",
    "check_cosine_warmup",
    "resnet_blocks",
    "saved_model_config",
    "torchvision_weights_name",
]

DatasetName = Literal["mnist", "fashion-mnist", "kmnist", "cifar10"]
Activation = Literal["relu", "sigmoid", "tanh"]

DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
MODEL_NAMES = ("lecture_cnn", "mlp", "resnet")  # and torchvision:<name>
TORCHVISION_PREFIX = "torchvision:"


# A layer's units or channels (every entry of conv_channels too: a width of 0 is refused).
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]


class DataConfig(Strict):
    name: DatasetName = "fashion-mnist"
    # Folder holding <name>/ with the four IDX files (.gz or not); relative to the repo.
    root: str = "data/raw"
    # Seeded, stratified subset of the 60,000 training images; null = all of them.
    train_subset: int | None = Field(6000, ge=20, le=MAX_IMAGES)
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


class ModelConfig(Strict):
    # lecture_cnn | mlp | resnet | torchvision:<name> (any torchvision classification model)
    name: str = "lecture_cnn"
    batchnorm: bool = True
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each hidden block
    # keras: Glorot-uniform weights and zero biases, the defaults of the lecture's Keras
    # layers; torch: PyTorch's defaults (Kaiming-uniform with a=sqrt(5)).
    init: Literal["keras", "torch"] = "keras"
    # lecture_cnn: channels of the three 5x5 convolutions and units of the hidden dense layer.
    conv_channels: tuple[Width, Width, Width] = (10, 40, 80)
    dense_units: Width = 50
    # mlp: number of hidden layers and their width; resnet: weight layers, 6n+2 (8, 14, 20).
    depth: int = Field(8, ge=1, le=MAX_DEPTH)
    width: Width = 128
    # resnet: channels of the first stage (x2, x4 in the next two), and whether its blocks
    # have the identity shortcut (false: the same layers as a plain stack).
    base_channels: Width = 16
    skip: bool = True
    # BatchNorm of deepopt's networks (lecture_cnn, mlp, resnet; a torchvision:<name> model
    # keeps its own, the settings its weights were trained with). Keras' defaults, which the
    # lecture ran: momentum 0.99 and epsilon 1e-3. bn_momentum is in PyTorch's convention,
    # the weight of the new batch (running = (1 - m) running + m batch): 0.01 is Keras'
    # 0.99, the running statistics averaging ~100 batches instead of PyTorch's default 0.1
    # (~10 batches), and they are what val_loss, early stopping and plateau see.
    # bn_eps (PyTorch's default 1e-5) is added to the batch variance under the square root.
    bn_momentum: float = Field(0.01, gt=0.0, le=1.0)
    bn_eps: float = Field(1e-3, gt=0.0, le=MAX_EPS)
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


# PyTorch's BatchNorm settings: what a model config saved before model.bn_momentum and
# model.bn_eps existed (they default to Keras' now) was trained and must be rebuilt with.
_SAVED_BEFORE_BN_KNOBS = {"bn_momentum": 0.1, "bn_eps": 1e-5}


def saved_model_config(saved: Any) -> ModelConfig:
    """The model config a file holds (model.pt, pretrain.pt), validated (ValidationError
    if bad); one saved before the BatchNorm knobs existed gets PyTorch's BatchNorm settings,
    which it was trained with, instead of today's defaults."""
    if isinstance(saved, dict):
        saved = {**_SAVED_BEFORE_BN_KNOBS, **saved}
    return ModelConfig.model_validate(saved)


class EarlyStopConfig(Strict):
    enabled: bool = True
    monitor: MonitorName = "val_loss"
    min_delta: float = Field(1e-4, ge=0.0, le=MAX_MIN_DELTA)  # absolute, as Keras
    patience: int = Field(5, ge=0, le=MAX_EPOCHS)  # epochs without improvement before stopping
    mode: Literal["auto", "min", "max"] = "auto"  # auto: min for val_loss, max for val_acc
    restore_best: bool = False  # the lecture keeps the last weights


class TrainConfig(Strict):
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    # Larger than the training split: each epoch is one batch of the whole split.
    batch_size: int = Field(50, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(1000, ge=1, le=MAX_BATCH)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)  # torch threads; null = all cores
    # auto = CUDA if available, else MPS, else the CPU; one not there is refused at start.
    device: str = "auto"
    # bf16: autocast (CPU: AMX/AVX512-BF16 kernels, ~1.7x faster epochs here, accuracy as
    # fp32's, benchmarks/bench_train.py). fp16: CUDA only, with a gradient scaler.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # CUDA: TF32 matmuls (opt-in; refused with deterministic, which promises fp32 digits).
    tf32: bool = False
    # CUDA: deterministic kernels, CUBLAS_WORKSPACE_CONFIG, no cuDNN autotuning.
    deterministic: bool = True
    ensemble: int = Field(1, ge=1, le=MAX_ENSEMBLE)  # members trained with seeds seed, seed+1, ...
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

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_spec(value)

    @model_validator(mode="after")
    def _tf32_not_deterministic(self) -> TrainConfig:
        if self.tf32 and self.deterministic:
            # TF32 rounds matmul inputs to 10 bits: fp32's last digits are not reproduced.
            raise ValueError("tf32: true needs deterministic: false")
        return self


class MlflowConfig(Strict):
    experiment: str = Field("deepopt", min_length=1)
    log_model: bool = True  # mlflow.pytorch.log_model at the end of each run
    # MLflow's system metrics (CPU, memory, and GPU utilization and memory with nvidia-ml-py)
    # sampled into each training run as system/* metrics: opt-in, a sampling thread per run.
    system_metrics: bool = False


class MatrixConfig(Strict):
    # Replicas: replica r trains with seed + r; 3 gives the report's intervals and tests an n.
    seeds: int = Field(3, ge=1, le=MAX_REPLICAS)


class RunConfig(Strict):
    """Everything one training run reads: the base config with an experiment applied."""

    seed: int = Field(4487, ge=0, le=MAX_SEED)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _cosine_phase(self) -> RunConfig:
        warmup = self.schedule.warmup_epochs  # filled in for cosine, None for the others
        if self.schedule.name == "cosine" and warmup is not None:
            check_cosine_warmup(warmup, self.train.epochs)
        return self

    @model_validator(mode="after")
    def _fits_in_memory(self) -> RunConfig:
        image = (3, 32, 32) if self.data.name == "cifar10" else (1, 28, 28)
        batches = {
            f"train.{key}": getattr(self.train, key) for key in ("batch_size", "eval_batch_size")
        }
        limits.check_memory(self.model.model_dump(), image, batches)
        return self


RUN_SECTIONS = tuple(RunConfig.model_fields)
