"""The transfer stages' trainings: their run configs, the pretrain run and pretrain.pt, and
the fine-tunes (one MLflow run per seed x target size x mode) with finetune.json's summary."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from deepopt import paths, tracking
from deepopt.config import (
    Params,
    RunConfig,
    TransferConfig,
    apply_overrides,
    resolve_transfer,
    saved_model_config,
)
from deepopt.data import file_sha256, image_shape
from deepopt.errors import ConfigError, DataError
from deepopt.files import UnreadableFileError, load_torch
from deepopt.training.member import MemberResult, log_test_metrics, train_tracked
from deepopt.training.seeds import Member
from deepopt.transfer.freezing import load_backbone, param_groups
from deepopt.transfer.tasks import (
    Task,
    few_shot,
    finetune_repeats,
    seeded_pool,
    split_digest,
    task_digest,
    task_tensors,
)

__all__ = [
    "PRETRAIN_RUN",
    "check_source",
    "finetune_config",
    "finetune_seeds",
    "finetune_target",
    "load_pretrained",
    "pretrain_config",
    "pretrain_source",
]

PRETRAIN_RUN = "pretrain"
_REPRETRAIN = "run `deepopt pretrain` (or `dvc repro transfer/dvc.yaml`)"

Tensors = tuple[torch.Tensor, torch.Tensor]


def pretrain_config(params: Params) -> RunConfig:
    """The base config with transfer.overrides, the source data set and pretrain_epochs
    (the network and optimizer every transfer run shares)."""
    transfer = params.transfer
    changes = {
        "data": {"name": transfer.source.dataset},
        "train": {"epochs": transfer.pretrain_epochs},
    }
    return apply_overrides(resolve_transfer(params), changes, "transfer")


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


def pretrain_source(
    config: RunConfig,
    task: Task,
    tensors: dict[str, Tensors],
    *,
    mean: float,
    std: float,
    experiment_id: str,
    checkpoints: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pretrain run on the source task (``source_per_class`` training and
    ``val_per_class`` validation images per class): one MLflow run named ``pretrain``,
    checkpointed and resumable like every training, then its test accuracy.

    Returns pretrain.pt's content (the weights with the model config, image shape, the
    source's classes and pixel statistics, and the MLflow run id, all plain data for
    ``weights_only`` loading) and pretrain.json's summary.
    """
    digest = task_digest(task)
    device = tensors["train"][0].device  # the stage put them on the run's device
    tags = {
        **tracking.run_tags(dataset=task.dataset, meta={"digest": digest}, device=device),
        "experiment": PRETRAIN_RUN,
        "transfer_role": "source",
        "transfer_classes": ",".join(map(str, task.classes)),
    }
    result = train_tracked(
        config,
        tensors,
        data_meta={"digest": digest, "num_classes": task.num_classes},
        experiment_id=experiment_id,
        run_name=PRETRAIN_RUN,
        member=Member(replica=0, index=0, seed=config.seed),
        checkpoint_dir=checkpoints,
        tags=tags,
    )
    test_loss, test_acc = log_test_metrics(result, config, task_tensors(task.test, mean, std))
    history = result.fit.history
    pretrained = {
        "state_dict": result.model.state_dict(),
        "model_config": config.model.model_dump(mode="json"),
        "image_shape": list(tensors["train"][0].shape[1:]),
        "num_classes": task.num_classes,
        "dataset": task.dataset,
        "classes": list(task.classes),
        "class_names": task.class_names,
        "mean": mean,
        "std": std,
        "data_digest": digest,
        "train_images": int(task.train.labels.numel()),
        "test_acc": test_acc,
        "seed": config.seed,
        "run_id": result.run_id,
        "mlflow_experiment_id": experiment_id,
    }
    summary = {
        "run_id": result.run_id,
        "dataset": task.dataset,
        "classes": list(task.classes),
        "train_images": int(task.train.labels.numel()),
        "test_images": int(task.test.labels.numel()),
        "epochs_run": result.fit.epochs_run,
        "stop_reason": result.fit.stop_reason,
        "final_val_acc": history[-1]["val_acc"],
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_seconds": sum(record["seconds"] for record in history),
    }
    return pretrained, summary


def load_pretrained(path: Path) -> dict[str, Any]:
    """pretrain.pt, loaded with weights_only=True (DataError when missing or malformed)."""
    try:
        content = load_torch(path)
    except FileNotFoundError:
        raise DataError(f"{path}: the pretrained network is missing; {_REPRETRAIN}") from None
    except UnreadableFileError as err:
        raise DataError(f"{path}: cannot be loaded ({err.problem}); {_REPRETRAIN}") from None
    keys = ("state_dict", "model_config", "image_shape", "num_classes", "mean", "std", "run_id")
    if not isinstance(content, dict) or any(key not in content for key in keys):
        raise DataError(f"{path}: not a pretrained network of deepopt; {_REPRETRAIN}")
    return content


def check_source(source: Mapping[str, Any], config: RunConfig, target: Task, path: Path) -> None:
    """The pretrained network fits the fine-tunes' model config and the target's images."""
    try:
        pretrained = saved_model_config(source["model_config"])
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


def _finetune_run(
    config: RunConfig,
    transfer: TransferConfig,
    source: Mapping[str, Any],
    tensors: dict[str, Tensors],
    *,
    key: str,
    num_classes: int,
    mode: str,
    run_name: str,
    member: Member,
    tags: dict[str, str],
    parent: str | None,
    experiment_id: str,
    checkpoints: Path,
) -> MemberResult:
    """One fine-tune: train_tracked from the pretrained backbone (scratch: none)."""
    return train_tracked(
        config,
        tensors,
        data_meta={"digest": hashlib.sha256(key.encode()).hexdigest(), "num_classes": num_classes},
        experiment_id=experiment_id,
        run_name=run_name,
        member=member,
        checkpoint_dir=checkpoints,
        tags=tags,
        parent_run_id=parent,
        setup=functools.partial(
            _setup,
            mode=mode,
            state=source["state_dict"],
            lr=config.optim.lr,
            scale=transfer.backbone_lr_scale,
        ),
    )


def finetune_seeds(config: RunConfig, transfer: TransferConfig) -> list[int]:
    """The fine-tunes' seeds: seed, seed + 1, ... (transfer.seeds of them)."""
    return [config.seed + k for k in range(transfer.seeds)]


def finetune_target(
    config: RunConfig,
    transfer: TransferConfig,
    source: Mapping[str, Any],
    task: Task,
    *,
    model_file: Path,
    val: Tensors,
    test: Tensors,
    experiment_id: str,
    checkpoints: Path,
) -> dict[str, Any]:
    """Every seed x target size x mode's fine-tune of the pretrained ``source``:
    finetune.json's summary (every run's test accuracy and more).

    For every seed (``finetune_seeds``), every ``transfer.target_sizes`` entry (labelled
    training images per target class) and every ``transfer.modes`` entry (linear_probe,
    finetune, scratch: see ``deepopt.transfer``) one training of
    ``transfer.finetune_epochs`` epochs without early stopping. The seed draws the
    labelled images (``seeded_pool``: a seed's smaller sets are subsets of its larger
    ones), the new head's initial weights (scratch: every layer's) and the batch order, so
    the modes of one size and seed see the same images: they compare pairwise by seed.
    Each is an MLflow run named ``<mode> size=<size> seed=<seed>``, checkpointed and
    resumable, tagged ``source_run_id`` (the pretrain run, also its parent, so ``mlflow ui``
    nests the fine-tunes under it), ``source_model_sha256``, ``transfer_mode``,
    ``target_per_class`` and ``seed``. ``val`` and ``test`` (and the training images) are
    normalized with the source's pixel statistics: the pretrained network's input
    distribution, and the same preprocessing for every mode.
    """
    mean, std = float(source["mean"]), float(source["std"])
    source_run = str(source["run_id"])
    model_sha = file_sha256(model_file)
    digest = task_digest(task)
    device = val[0].device  # the stage put them on the run's device
    tags = {
        **tracking.run_tags(dataset=task.dataset, meta={"digest": digest}, device=device),
        "transfer_role": "target",
        "transfer_classes": ",".join(map(str, task.classes)),
        "source_run_id": source_run,
        "source_model": str(model_file),
        "source_model_sha256": model_sha,
    }
    parent = source_run if tracking.run_exists(source_run) else None
    few_shot(task.train, transfer.target_sizes[-1], task.num_classes)  # refused before training
    seeds = finetune_seeds(config, transfer)
    runs = []
    for replica, seed in enumerate(seeds):
        pool = seeded_pool(task.train, task.num_classes, seed)
        for per_class in transfer.target_sizes:
            subset = few_shot(pool, per_class, task.num_classes)
            subset_digest = split_digest(subset)
            repeats = finetune_repeats(
                subset.labels.numel(), config.train.batch_size, transfer.finetune_min_batches
            )
            images, labels = task_tensors(subset, mean, std)
            # Whole copies, reshuffled every epoch: [repeats * n, C, H, W]
            train = (
                images.repeat(repeats, 1, 1, 1).to(device),
                labels.repeat(repeats).to(device),
            )
            for mode in transfer.modes:
                # What trains this run beyond its RunConfig and seed (the checkpoints' key):
                # the labelled set, the mode, the pretrained start and the backbone's
                # learning-rate scale.
                start = model_sha if mode != "scratch" else ""
                scale = transfer.backbone_lr_scale if mode == "finetune" else ""
                result = _finetune_run(
                    config,
                    transfer,
                    source,
                    {"train": train, "val": val},
                    key=f"{digest}:{subset_digest}:{repeats}:{mode}:{start}:{scale}",
                    num_classes=task.num_classes,
                    mode=mode,
                    run_name=f"{mode} size={per_class} seed={seed}",
                    member=Member(replica=replica, index=0, seed=seed),
                    tags={**tags, "transfer_mode": mode, "target_per_class": str(per_class)},
                    parent=parent,
                    experiment_id=experiment_id,
                    checkpoints=checkpoints,
                )
                test_loss, test_acc = log_test_metrics(result, config, test)
                history = result.fit.history
                runs.append(
                    {
                        "mode": mode,
                        "per_class": per_class,
                        "seed": seed,
                        "replica": replica,
                        "train_images": int(subset.labels.numel()),
                        "train_digest": subset_digest,
                        "repeats": repeats,
                        "steps": result.fit.epochs_run
                        * -(-len(train[1]) // config.train.batch_size),
                        "final_val_acc": history[-1]["val_acc"],
                        "test_acc": test_acc,
                        "test_loss": test_loss,
                        "train_seconds": sum(record["seconds"] for record in history),
                        "run_id": result.run_id,
                    }
                )
    return {
        "source": {
            "dataset": source.get("dataset"),
            "classes": source.get("classes"),
            "class_names": source.get("class_names"),
            "train_images": source.get("train_images"),
            "test_acc": source.get("test_acc"),
            "seed": source.get("seed"),
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
        "seeds": seeds,
        "runs": runs,
    }
