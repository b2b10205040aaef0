"""The ``finetune`` stage (transfer/dvc.yaml): start from the pretrained network on the
target task with few labels, in each mode, and write the transfer table and plot.

For every ``transfer.target_sizes`` entry (labelled training images per target class) and
every ``transfer.modes`` entry (linear_probe, finetune, scratch: see ``deepopt.transfer``)
one training of ``transfer.finetune_epochs`` epochs without early stopping, each an MLflow
run named ``finetune/<mode>/<size>``, checkpointed and resumable, tagged ``source_run_id``
(the pretrain run, also its parent, so ``mlflow ui`` nests the fine-tunes under it),
``source_model_sha256``, ``transfer_mode`` and ``target_per_class``. Images are normalized
with the source's pixel statistics: the pretrained network's input distribution, and the
same preprocessing for every mode.

Writes ``transfer/metrics/finetune.json`` (every run's test accuracy and more),
``transfer/report.md`` (the table: size x mode -> test accuracy) and
``transfer/accuracy_vs_size.png``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from deepopt import paths, tracking
from deepopt.config import ModelConfig, Params, RunConfig, apply_overrides, resolve_transfer
from deepopt.data import file_sha256, image_shape
from deepopt.errors import ConfigError, DataError
from deepopt.files import check_writable, write_bytes, write_json, write_text
from deepopt.metrics import loss_and_accuracy
from deepopt.report import png_bytes
from deepopt.train import Member, train_tracked
from deepopt.training import evaluate_logits
from deepopt.transfer import (
    Task,
    accuracy_figure,
    few_shot,
    finetune_repeats,
    load_backbone,
    load_task,
    param_groups,
    render_report,
    task_digest,
    task_tensors,
)

__all__ = ["finetune_config", "load_pretrained", "main"]

_REPRETRAIN = "run `deepopt pretrain` (or `dvc repro transfer/dvc.yaml`)"


def finetune_config(params: Params) -> RunConfig:
    """The pretrain network and optimizer, on the target data set, finetune_epochs long
    without early stopping (there is no validation set worth the name with 10 labels).
    ``model.weights`` is dropped: the pretrained network is the start (scratch: none)."""
    transfer = params.transfer
    changes = {
        "data": {"name": transfer.target.dataset},
        "model": {"weights": None},
        "train": {"epochs": transfer.finetune_epochs},
        "early_stop": {"enabled": False},
    }
    return apply_overrides(resolve_transfer(params), changes, "transfer")


def load_pretrained(path: Path) -> dict[str, Any]:
    """pretrain.pt, loaded with weights_only=True (DataError when missing or malformed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol note: one line below
            content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: the pretrained network is missing; {_REPRETRAIN}") from None
    except Exception as err:  # torch raises several types for a corrupt archive
        raise DataError(f"{path}: cannot be loaded ({type(err).__name__}); {_REPRETRAIN}") from None
    keys = ("state_dict", "model_config", "image_shape", "num_classes", "mean", "std", "run_id")
    if not isinstance(content, dict) or any(key not in content for key in keys):
        raise DataError(f"{path}: not a pretrained network of deepopt; {_REPRETRAIN}")
    return content


def _check_source(source: Mapping[str, Any], config: RunConfig, target: Task, path: Path) -> None:
    try:
        pretrained = ModelConfig.model_validate(source["model_config"])
    except ValidationError:
        raise DataError(f"{path}: its model config is not valid; {_REPRETRAIN}") from None
    if pretrained.model_copy(update={"weights": None}) != config.model:
        raise ConfigError(
            f"{path} was pretrained with model.name {pretrained.name} and other model settings "
            f"than transfer.overrides give now; {_REPRETRAIN}"
        )
    shape = list(image_shape(target.train.images))
    if list(source["image_shape"]) != shape:
        raise ConfigError(
            f"transfer.target.dataset: {target.dataset} images are {shape}, the pretrained "
            f"network's {list(source['image_shape'])}; source and target need one image shape"
        )


def _setup(
    model: nn.Module, *, mode: str, state: Mapping[str, torch.Tensor], lr: float, scale: float
) -> list[dict[str, Any]]:
    """train_tracked's hook: the pretrained backbone (not for scratch), then the mode's
    param groups (linear_probe freezes the backbone)."""
    if mode != "scratch":
        load_backbone(model, state, str(paths.transfer_model_path()))
    return param_groups(model, mode, lr, scale)


def main(params: Params, **_: object) -> dict[str, Any]:
    transfer = params.transfer
    config = finetune_config(params)
    model_file = paths.transfer_model_path()
    outputs = (
        paths.transfer_metrics_path("finetune"),
        paths.transfer_report_path(),
        paths.transfer_plot_path(),
    )
    checkpoints = paths.transfer_checkpoint_dir(config.train.checkpoint_dir, "finetune")
    check_writable(*outputs, checkpoints / "member.pt")
    source = load_pretrained(model_file)
    task = load_task(
        transfer.target,
        root=Path(params.data.root),
        train_per_class=transfer.target_sizes[-1],
        val_per_class=transfer.val_per_class,
        seed=params.seed,
        key="transfer.target",
    )
    _check_source(source, config, task, model_file)
    mean, std = float(source["mean"]), float(source["std"])
    val = task_tensors(task.val, mean, std)
    test_images, test_labels = task_tensors(task.test, mean, std)
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    source_run = str(source["run_id"])
    model_sha = file_sha256(model_file)
    digest = task_digest(task)
    tags = {
        **tracking.run_tags(dataset=task.dataset, meta={"digest": digest}),
        "transfer_role": "target",
        "transfer_classes": ",".join(map(str, task.classes)),
        "source_run_id": source_run,
        "source_model": str(model_file),
        "source_model_sha256": model_sha,
    }
    parent = source_run if tracking.run_exists(source_run) else None
    runs = []
    for per_class in transfer.target_sizes:
        subset = few_shot(task.train, per_class, task.num_classes)
        repeats = finetune_repeats(
            subset.labels.numel(), config.train.batch_size, transfer.finetune_min_batches
        )
        images, labels = task_tensors(subset, mean, std)
        # Whole copies, reshuffled every epoch: [repeats * n, C, H, W]
        train = (images.repeat(repeats, 1, 1, 1), labels.repeat(repeats))
        for mode in transfer.modes:
            # What trains this run beyond its RunConfig (the checkpoints' key): the data, the
            # mode, the pretrained start and the backbone's learning-rate scale.
            start = model_sha if mode != "scratch" else ""
            scale = transfer.backbone_lr_scale if mode == "finetune" else ""
            key = f"{digest}:{per_class}:{repeats}:{mode}:{start}:{scale}"
            result = train_tracked(
                config,
                {"train": train, "val": val},
                data_meta={
                    "digest": hashlib.sha256(key.encode()).hexdigest(),
                    "num_classes": task.num_classes,
                },
                experiment_id=experiment_id,
                run_name=f"finetune/{mode}/{per_class}",
                member=Member(replica=0, index=0, seed=config.seed),
                checkpoint_dir=checkpoints,
                tags={**tags, "transfer_mode": mode, "target_per_class": str(per_class)},
                parent_run_id=parent,
                setup=functools.partial(
                    _setup,
                    mode=mode,
                    state=source["state_dict"],
                    lr=config.optim.lr,
                    scale=transfer.backbone_lr_scale,
                ),
            )
            logits = evaluate_logits(
                result.model, test_images, config.train.eval_batch_size, config.train.precision
            )
            test_loss, test_acc = loss_and_accuracy(torch.log_softmax(logits, dim=1), test_labels)
            tracking.log_metrics(result.run_id, {"test_acc": test_acc, "test_loss": test_loss})
            history = result.fit.history
            runs.append(
                {
                    "mode": mode,
                    "per_class": per_class,
                    "train_images": int(subset.labels.numel()),
                    "repeats": repeats,
                    "steps": result.fit.epochs_run * -(-len(train[1]) // config.train.batch_size),
                    "final_val_acc": history[-1]["val_acc"],
                    "test_acc": test_acc,
                    "test_loss": test_loss,
                    "train_seconds": sum(record["seconds"] for record in history),
                    "run_id": result.run_id,
                }
            )
    summary = {
        "source": {
            "dataset": source.get("dataset"),
            "classes": source.get("classes"),
            "class_names": source.get("class_names"),
            "train_images": source.get("train_images"),
            "test_acc": source.get("test_acc"),
            "run_id": source_run,
            "model_sha256": model_sha,
        },
        "target": {
            "dataset": task.dataset,
            "classes": list(task.classes),
            "class_names": task.class_names,
            "val_images": int(task.val.labels.numel()),
            "test_images": int(task.test.labels.numel()),
        },
        "model": config.model.name,
        "epochs": transfer.finetune_epochs,
        "backbone_lr_scale": transfer.backbone_lr_scale,
        "min_batches": transfer.finetune_min_batches,
        "runs": runs,
    }
    metrics_file, report_file, plot_file = outputs
    write_json(metrics_file, summary)
    write_bytes(plot_file, png_bytes(lambda: accuracy_figure(runs)))
    write_text(report_file, render_report(summary, plot_file.name))
    return {
        "stage": "finetune",
        "report": str(report_file),
        "test_acc": {f"{r['mode']}/{r['per_class']}": r["test_acc"] for r in runs},
    }
