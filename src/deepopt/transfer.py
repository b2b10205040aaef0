"""Transfer learning's pieces, without I/O or tracking: the stages ``pretrain`` and
``finetune`` call them.

Tasks. A task is some classes of a data set, relabelled 0, 1, ... in the order listed
(``transfer.source``/``transfer.target``). Its validation images and its training pool are
drawn from the data set's training file with one seeded random order per class: the first
``val_per_class`` of each class validate, the next ones train. The training pool is stored
rank by rank (the first image of every class, then the second of every class, ...), so
"the first k per class" is simply its first k x classes images and the smaller fine-tune
sets are subsets of the larger ones: only the number of labels changes between them. The
test images are all test images of the task's classes.

Modes of a fine-tune (``transfer.modes``), all on the same network:

- ``linear_probe``: the pretrained backbone is frozen, the head alone learns. Frozen means
  its parameters get no gradient *and* its BatchNorm layers keep normalizing with the
  source's statistics (``FrozenBatchNorm``): the features are exactly the pretrained ones.
- ``finetune``: every layer learns from the pretrained start; the backbone's learning rate
  is ``optim.lr x transfer.backbone_lr_scale``.
- ``scratch``: the same network from random weights, the baseline.

The head (the last Conv/Linear layer) is always new, initialised like the network's other
layers from the run's seed, even when source and target have as many classes: the classes
mean something else.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from deepopt.config import TransferTask
from deepopt.data import DATASETS, RawData, Split, locate_raw, normalize, read_raw
from deepopt.errors import ConfigError
from deepopt.models import head_name

__all__ = [
    "FrozenBatchNorm",
    "Task",
    "accuracy_figure",
    "class_orders",
    "few_shot",
    "finetune_repeats",
    "freeze_backbone",
    "load_backbone",
    "load_task",
    "make_task",
    "param_groups",
    "render_report",
    "select_classes",
    "task_digest",
    "task_tensors",
    "transfer_table",
]


@dataclass(frozen=True, eq=False)
class Task:
    dataset: str
    classes: tuple[int, ...]  # the data set's class indices, in the task's label order
    class_names: list[str]
    train: Split  # rank by rank: see few_shot
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def select_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> Split:
    """The images of ``classes`` in file order, labelled by their position in ``classes``."""
    relabel = torch.full((256,), -1, dtype=torch.int64)
    relabel[torch.tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
    new_labels = relabel[labels.to(torch.int64)]
    keep = (new_labels >= 0).nonzero().flatten()
    return Split(images[keep], new_labels[keep])


def class_orders(labels: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """Each class's indices into ``labels`` in a seeded random order (one generator,
    classes in order, so the order of a class depends only on the seed and the file)."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().flatten()  # ascending file order
        orders.append(members[torch.randperm(members.numel(), generator=generator)])
    return orders


def make_task(
    raw: RawData,
    *,
    dataset: str,
    classes: Sequence[int],
    class_names: Sequence[str],
    train_per_class: int | None,
    val_per_class: int,
    seed: int,
    key: str,
) -> Task:
    """The task of ``classes``: ``val_per_class`` validation and ``train_per_class``
    training images per class (None: all the rest) from the training file, rank by rank.
    ``key`` names the config section in errors (transfer.source / transfer.target)."""
    pool = select_classes(raw.train_images, raw.train_labels, classes)
    orders = class_orders(pool.labels, len(classes), seed)
    available = min(order.numel() for order in orders)
    wanted = val_per_class + (train_per_class or 1)
    if available < wanted:
        raise ConfigError(
            f"{key}: a class of {dataset} has only {available} training images, fewer than "
            f"transfer.val_per_class + the training images per class ({wanted})"
        )
    train_count = available - val_per_class if train_per_class is None else train_per_class
    val_idx = torch.cat([order[:val_per_class] for order in orders]).sort().values
    # [train_count, classes] -> flattened rank by rank: the first k x classes are k per class
    ranks = torch.stack([o[val_per_class : val_per_class + train_count] for o in orders], dim=1)
    train_idx = ranks.flatten()
    return Task(
        dataset=dataset,
        classes=tuple(classes),
        class_names=[str(class_names[c]) for c in classes],
        train=Split(pool.images[train_idx], pool.labels[train_idx]),
        val=Split(pool.images[val_idx], pool.labels[val_idx]),
        test=select_classes(raw.test_images, raw.test_labels, classes),
    )


def load_task(
    task: TransferTask,
    *,
    root: Path,
    train_per_class: int | None,
    val_per_class: int,
    seed: int,
    key: str,
) -> Task:
    """``make_task`` on the raw files of ``task.dataset`` (found as the prepare stage finds
    them: ``<root>/<name>/``, Debian's Fashion-MNIST, a download)."""
    raw = read_raw(locate_raw(task.dataset, root))
    return make_task(
        raw,
        dataset=task.dataset,
        classes=task.classes,
        class_names=DATASETS[task.dataset].class_names,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        seed=seed,
        key=key,
    )


def task_digest(task: Task) -> str:
    """A hash of the task's images and labels (all three splits): what keys checkpoints."""
    digest = hashlib.sha256(f"{task.dataset}:{list(task.classes)}".encode())
    for split in (task.train, task.val, task.test):
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def task_tensors(split: Split, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's float input [N, C, H, W] and the labels of a split."""
    return normalize(split.images, mean, std), split.labels


def few_shot(train: Split, per_class: int, num_classes: int) -> Split:
    """The first ``per_class`` training images of every class of a rank-by-rank pool."""
    count = per_class * num_classes
    if count > train.labels.numel():
        raise ConfigError(
            f"transfer.target_sizes: {per_class} per class is more than the "
            f"{train.labels.numel() // num_classes} training images per class available"
        )
    return Split(train.images[:count], train.labels[:count])


def finetune_repeats(train_images: int, batch_size: int, min_batches: int) -> int:
    """Whole copies of a training set that give an epoch at least ``min_batches`` batches."""
    return max(1, math.ceil(min_batches * batch_size / train_images))


# ---------------------------------------------------------------------------------------
# Networks: the pretrained start, frozen backbones, param groups


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer that always normalizes with its stored statistics and scale and
    learns nothing: what a frozen backbone's BatchNorm must do even in training mode.

    Its buffers carry the same names as BatchNorm's parameters and buffers, so its state
    dict loads into the plain network (and back).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if norm.running_mean is None or norm.running_var is None:
            raise ConfigError("a BatchNorm layer without running statistics cannot be frozen")
        self.eps = norm.eps
        self.weight: torch.Tensor | None
        self.bias: torch.Tensor | None
        for name in ("weight", "bias"):
            value = getattr(norm, name)
            self.register_buffer(name, None if value is None else value.detach().clone())
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        tracked = norm.num_batches_tracked
        self.register_buffer("num_batches_tracked", None if tracked is None else tracked.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C] or [B, C, H, W], per-channel (x - mean) / sqrt(var + eps) * weight + bias
        return nn.functional.batch_norm(
            x,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the head, in place; the head's parameters."""
    head = head_name(model)
    norms = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not (name == head or name.startswith(f"{head}."))
    ]
    for name, module in norms:
        model.set_submodule(name, FrozenBatchNorm(module))
    trainable = _head_parameters(model)
    keep = {id(p) for p in trainable}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return trainable


def param_groups(
    model: nn.Module, mode: str, lr: float, backbone_lr_scale: float
) -> list[dict[str, Any]]:
    """The optimizer's param groups of a fine-tune in ``mode``, head first (the history's
    lr is the head's). linear_probe freezes the backbone in place."""
    if mode == "linear_probe":
        return [{"params": freeze_backbone(model)}]
    head = _head_parameters(model)
    ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in ids]
    if mode == "finetune":
        return [{"params": head}, {"params": backbone, "lr": lr * backbone_lr_scale}]
    if mode == "scratch":
        return [{"params": head}, {"params": backbone}]
    raise ConfigError(f"transfer.modes: {mode!r} is not one of linear_probe, finetune, scratch")


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the pretrained ``state`` into every layer but the head (left as initialised)."""
    prefix = f"{head_name(model)}."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing = sorted(own.keys() - body.keys())
    unexpected = sorted(body.keys() - own.keys())
    wrong = [k for k in own.keys() & body.keys() if own[k].shape != body[k].shape]
    if missing or unexpected or wrong:
        problem = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} has shape {list(body[wrong[0]].shape)}, the network's "
            f"{list(own[wrong[0]].shape)}"
        )
        raise ConfigError(
            f"{source}: the pretrained weights do not fit the network of transfer.overrides "
            f"({problem}); run the pretrain stage again"
        )
    model.load_state_dict(body, strict=False)


# ---------------------------------------------------------------------------------------
# The transfer table and plot (pure: same results, same text and figure)

MODE_LABELS = {
    "linear_probe": "linear probe",
    "finetune": "fine-tune",
    "scratch": "from scratch",
}


def _accuracy(runs: Sequence[Mapping[str, Any]], mode: str, per_class: int) -> float | None:
    for run in runs:
        if run["mode"] == mode and run["per_class"] == per_class:
            return float(run["test_acc"])
    return None


def transfer_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: labelled images per class x mode -> test accuracy."""
    modes = list(dict.fromkeys(str(r["mode"]) for r in runs))
    sizes = sorted({int(r["per_class"]) for r in runs})
    header = ["labelled / class", *(MODE_LABELS.get(m, m) for m in modes)]
    lines = ["| " + " | ".join(header) + " |", "|---:|" + "---:|" * len(modes)]
    for size in sizes:
        cells = [str(size)]
        for mode in modes:
            acc = _accuracy(runs, mode, size)
            cells.append("—" if acc is None else f"{acc:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def accuracy_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Test accuracy against labelled images per class (log axis), one line per mode."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = fig.add_subplot()
    markers = {"linear_probe": "s", "finetune": "o", "scratch": "^"}
    for mode in dict.fromkeys(str(r["mode"]) for r in runs):
        points = sorted(
            (int(r["per_class"]), float(r["test_acc"])) for r in runs if r["mode"] == mode
        )
        axis.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers.get(mode, "x"),
            label=MODE_LABELS.get(mode, mode),
        )
    axis.set_xscale("log")
    sizes = sorted({int(r["per_class"]) for r in runs})
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("labelled training images per class")
    axis.set_ylabel("test accuracy")
    axis.set_title("Transfer: accuracy against labelled data")
    axis.grid(True)
    axis.legend()
    return fig


def render_report(summary: Mapping[str, Any], plot_file: str) -> str:
    """transfer/report.md from finetune's metrics (pure)."""
    source, target = summary["source"], summary["target"]
    runs = summary["runs"]

    def task(part: Mapping[str, Any]) -> str:
        names = ", ".join(part["class_names"])
        return f"{part['dataset']} classes {list(part['classes'])} ({names})"

    lines = [
        "# Transfer learning",
        "",
        f"Source: {task(source)}, {source['train_images']} training images; the pretrained "
        f"network reaches test accuracy {source['test_acc']:.4f} on its own task "
        f"(MLflow run `{source['run_id']}`).",
        f"Target: {task(target)}; test accuracy on all {target['test_images']} test images of "
        "its classes. Network: "
        f"`{summary['model']}`; every fine-tune trains {summary['epochs']} epochs.",
        "",
        *transfer_table(runs),
        "",
        "Modes: linear probe = the pretrained backbone frozen (BatchNorm statistics "
        "included), only a new head learns; fine-tune = all layers learn from the pretrained "
        f"start, the backbone at {summary['backbone_lr_scale']:g} x the head's learning rate; "
        "from scratch = the same network from random weights. The smaller training sets are "
        "subsets of the larger ones; a set with fewer than "
        f"{summary['min_batches']} batches is repeated within an epoch (steps per run below).",
        "",
        f"![test accuracy against labelled images per class]({plot_file})",
        "",
        "| mode | labelled / class | train images | repeats | steps | final val acc | "
        "test acc | train s | MLflow run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        lines.append(
            f"| {MODE_LABELS.get(run['mode'], run['mode'])} | {run['per_class']} | "
            f"{run['train_images']} | {run['repeats']} | {run['steps']} | "
            f"{run['final_val_acc']:.4f} | {run['test_acc']:.4f} | {run['train_seconds']:.1f} | "
            f"`{run['run_id']}` |"
        )
    return "\n".join(lines) + "\n"
