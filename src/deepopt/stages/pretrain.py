"""The ``pretrain`` stage (transfer/dvc.yaml): train a network on transfer.source and write
transfer/models/pretrain.pt and transfer/metrics/pretrain.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params
from deepopt.data import pixel_stats
from deepopt.files import check_writable, write_json, write_torch
from deepopt.transfer import load_task, task_tensors
from deepopt.transfer.runs import PRETRAIN_RUN, pretrain_config, pretrain_source

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    transfer = params.transfer
    config = pretrain_config(params)
    device = devices.start_device(  # before any CUDA tensor; refused at once when not there
        config.train.device,
        config.train.precision,
        deterministic=config.train.deterministic,
        tf32=config.train.tf32,
    )
    model_file, metrics_file = paths.transfer_model_path(), paths.transfer_metrics_path("pretrain")
    checkpoints = paths.transfer_checkpoint_dir(config.train.checkpoint_dir, PRETRAIN_RUN)
    check_writable(model_file, metrics_file, checkpoints / "member.pt")
    task = load_task(
        transfer.source,
        root=Path(params.data.root),
        train_per_class=transfer.source_per_class,
        val_per_class=transfer.val_per_class,
        seed=params.seed,
        key="transfer.source",
    )
    mean, std = pixel_stats(task.train.images)
    tensors = {}  # on the device: the run trains there
    for name, split in (("train", task.train), ("val", task.val)):
        images, labels = task_tensors(split, mean, std)
        tensors[name] = (images.to(device), labels.to(device))
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    pretrained, summary = pretrain_source(
        config,
        task,
        tensors,
        mean=mean,
        std=std,
        experiment_id=experiment_id,
        checkpoints=checkpoints,
    )
    write_torch(model_file, devices.to_cpu(pretrained))  # CPU tensors: loads anywhere
    write_json(metrics_file, summary)
    return {"stage": "pretrain", "model": str(model_file), **summary}
