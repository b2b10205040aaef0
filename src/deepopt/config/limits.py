"""Upper bounds of the config's numbers, and the memory a model and its batches would take.

Every bound is generous, far beyond any run this pipeline makes, so that a typo or an
overflow (2**63, 1e300) is a one-line config error before anything runs, never a
traceback deep in torch, a crash, a run that cannot end or a "diverged" exit. NaN and
infinities are refused by every config section (``Strict``: ``allow_inf_nan=False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_VALUES",
    "MAX_DEPTH",
    "MAX_ENSEMBLE",
    "MAX_EPOCHS",
    "MAX_EPS",
    "MAX_FINETUNE_IMAGES",
    "MAX_HEARTBEAT",
    "MAX_HEARTBEAT_GRACE",
    "MAX_IMAGES",
    "MAX_INITIAL_ACCUMULATOR",
    "MAX_LR",
    "MAX_MIN_DELTA",
    "MAX_REPLICAS",
    "MAX_SEED",
    "MAX_THREADS",
    "MAX_TIMEOUT",
    "MAX_TRIALS",
    "MAX_WEIGHTS",
    "MAX_WEIGHT_DECAY",
    "MAX_WIDTH",
    "MAX_WORKERS",
    "check_memory",
    "model_size",
]

# Seeds (seed, tune.sampler_seed): numpy's RandomState (Optuna's samplers) takes seeds below
# 2**32, and member seeds (seed + replica + MAX_REPLICAS * member) stay below that.
MAX_SEED = 2**31 - 1
# Epochs (train.epochs, tune.epochs, horizon, patience, warmup...): the lecture trains
# 3-100; 100,000 epochs of the smallest data set already take days.
MAX_EPOCHS = 100_000
# Image counts (data.train_subset, transfer per-class counts): more than any supported data
# set holds (60,000 training images); the stages check the real counts.
MAX_IMAGES = 1_000_000
# Batch sizes: more than the largest training split (60,000 images), so one batch of all of
# it (full-batch gradient descent) is allowed; MAX_BATCH_VALUES bounds the memory.
MAX_BATCH = 100_000
# Units and channels of a layer (dense_units, width, conv_channels, base_channels): 64 Ki,
# wider than any published network of these images; MAX_WEIGHTS bounds the whole model.
MAX_WIDTH = 65_536
# Layers (model.depth): the deepest ResNet of He et al. (2016) has 1,202.
MAX_DEPTH = 2_000
# torch threads: more than any CPU has cores (torch.set_num_threads(10**8) crashes).
MAX_THREADS = 1_024
# Ensemble members per replica and replicas (matrix.seeds): each is a whole training run.
MAX_ENSEMBLE = 100
MAX_REPLICAS = 100
# Learning rates (optim.lr, final_lr, min_lr): the lecture's are 0.001-0.02; above 10 every
# optimizer here diverges in its first steps (an exit 3 after training started).
MAX_LR = 10.0
# L2 penalty: at 1 it already outweighs any of these losses.
MAX_WEIGHT_DECAY = 1.0
# optim.eps and model.bn_eps (numerical safety terms, 1e-7 and 1e-3 by default, as Keras'):
# at 1 it is the whole denominator.
MAX_EPS = 1.0
# Adagrad's initial accumulator is in squared-gradient units: at 100 the first steps are
# already 10x smaller than lr (sqrt(100)); Keras' default is 0.1.
MAX_INITIAL_ACCUMULATOR = 100.0
# min_delta (early stopping, plateau): no loss or accuracy here changes by 100 in an epoch.
MAX_MIN_DELTA = 100.0
# Optuna trials (tune.n_trials, --n-trials, startup trials): each trial is a training run.
MAX_TRIALS = 100_000
# tune.workers: processes, each with a copy of the data; more than cores only slows down.
MAX_WORKERS = 256
# tune.timeout: a year in seconds.
MAX_TIMEOUT = 365 * 24 * 3600.0
# Heartbeats (seconds): a dead trial waits heartbeat_grace before it is queued again.
MAX_HEARTBEAT = 3_600
MAX_HEARTBEAT_GRACE = 86_400
# Weights of a model: 1e9 are 4 GB in fp32, and training holds 3-4 times that (gradients,
# momentum or Adam's moments); the lecture's networks have 0.1-0.3 million.
MAX_WEIGHTS = 1_000_000_000
# Layer outputs of one batch (batch size x outputs per image): 2**32 values are 17 GB in
# fp32, and training keeps several such copies for the backward pass; the lecture's
# largest batch (1,000 test images) needs 8 million.
MAX_BATCH_VALUES = 2**32
# Images of one fine-tune epoch (finetune_min_batches x batch_size copies of the small
# training sets, held as fp32 tensors): 1e6 images are 3 GB of 28x28 (12 GB of CIFAR-10).
MAX_FINETUNE_IMAGES = 1_000_000


def _conv_out(size: int, stride: int, kernel: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def model_size(
    name: str,
    image: Sequence[int],
    classes: int,
    *,
    conv_channels: Sequence[int],
    dense_units: int,
    depth: int,
    width: int,
    base_channels: int,
) -> tuple[int, int]:
    """About how many weights the model ``name`` has and how many values its hidden layers
    output per image ([channels, height, width] inputs, ``classes`` outputs): lecture_cnn,
    mlp or resnet. An estimate of deepopt.models' networks to bound memory, not an exact
    count."""
    channels, height, size = image
    if name == "lecture_cnn":  # 5x5 convolutions with padding 2, strides 2, 2, 1
        weights, outputs, previous = 0, 0, channels
        for out, stride in zip(conv_channels, (2, 2, 1), strict=True):
            weights += 25 * previous * out
            height, size = _conv_out(height, stride, 5, 2), _conv_out(size, stride, 5, 2)
            outputs += out * height * size
            previous = out
        weights += previous * height * size * dense_units + dense_units * classes
        return weights, outputs + dense_units
    if name == "mlp":
        weights = channels * height * size * width + (depth - 1) * width**2 + width * classes
        return weights, depth * width
    if name == "resnet":  # 3x3 convolutions; stages of base, 2x and 4x channels
        blocks = max(1, (depth - 2) // 6)
        weights, outputs = 9 * channels * base_channels, base_channels * height * size
        for stage in range(3):
            wide = base_channels * 2**stage
            weights += blocks * 2 * 9 * wide * wide
            outputs += blocks * 2 * wide * (height >> stage) * (size >> stage)
        return weights + 4 * base_channels * classes, outputs
    raise ValueError(f"no size estimate for model {name!r}")


# The knobs that size each of deepopt's own networks (named in the memory check's message).
_SIZE_KNOBS = {
    "lecture_cnn": ("conv_channels", "dense_units"),
    "mlp": ("depth", "width"),
    "resnet": ("depth", "base_channels"),
}


def check_memory(model: Mapping[str, Any], image: Sequence[int], batches: dict[str, int]) -> None:
    """ValueError when the network of ``model`` (a ModelConfig as a dict) for ``image``
    inputs, or one of its batches (key path -> batch size), would not fit in memory."""
    name = model["name"]
    if name not in _SIZE_KNOBS:  # torchvision:<name>: its architecture fixes its size
        return
    weights, outputs = model_size(
        name,
        image,
        10,
        conv_channels=model["conv_channels"],
        dense_units=model["dense_units"],
        depth=model["depth"],
        width=model["width"],
        base_channels=model["base_channels"],
    )
    shown = ", ".join(f"{key} {_listed(model[key])}" for key in _SIZE_KNOBS[name])
    if weights > MAX_WEIGHTS:
        raise ValueError(
            f"model: {name} with {shown} has about {weights:.2g} weights, more than the "
            f"{MAX_WEIGHTS:.0e} allowed (4 GB of fp32 weights before gradients and optimizer "
            "state); use fewer or narrower layers"
        )
    for key, batch in batches.items():
        if batch * outputs > MAX_BATCH_VALUES:
            raise ValueError(
                f"{key}: {batch} images x about {outputs} layer outputs each ({name} with "
                f"{shown}) are {batch * outputs:.2g} values, more than the "
                f"{MAX_BATCH_VALUES:.2g} allowed (17 GB in fp32); use a smaller batch"
            )


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
