"""The ``pretrain`` stage (transfer/dvc.yaml): train a network on the source task and save it.

Reads ``seed``, ``data.root``, the run-config sections and ``transfer.*``: the network and
optimizer are the base config with ``transfer.overrides`` applied, trained for
``transfer.pretrain_epochs`` on ``transfer.source`` (its classes of its data set,
``source_per_class`` training and ``val_per_class`` validation images per class). One
MLflow run named ``pretrain``, checkpointed and resumable like every training.

Writes ``transfer/models/pretrain.pt`` (the weights with the model config, image shape,
the source's classes and pixel statistics, and the MLflow run id, all plain data for
``weights_only`` loading) and ``transfer/metrics/pretrain.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deepopt import paths, tracking
from deepopt.config import Params, RunConfig, apply_overrides, resolve_transfer
from deepopt.data import pixel_stats
from deepopt.files import check_writable, write_json, write_torch
from deepopt.metrics import loss_and_accuracy
from deepopt.train import Member, train_tracked
from deepopt.training import evaluate_logits
from deepopt.transfer import load_task, task_digest, task_tensors

__all__ = ["main", "pretrain_config"]

RUN_NAME = "pretrain"


def pretrain_config(params: Params) -> RunConfig:
    """The base config with transfer.overrides, the source data set and pretrain_epochs."""
    transfer = params.transfer
    changes = {
        "data": {"name": transfer.source.dataset},
        "train": {"epochs": transfer.pretrain_epochs},
    }
    return apply_overrides(resolve_transfer(params), changes, "transfer")


def main(params: Params, **_: object) -> dict[str, Any]:
    transfer = params.transfer
    config = pretrain_config(params)
    model_file, metrics_file = paths.transfer_model_path(), paths.transfer_metrics_path("pretrain")
    checkpoints = paths.transfer_checkpoint_dir(config.train.checkpoint_dir, RUN_NAME)
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
    tensors = {
        "train": task_tensors(task.train, mean, std),
        "val": task_tensors(task.val, mean, std),
    }
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    digest = task_digest(task)
    tags = {
        **tracking.run_tags(dataset=task.dataset, meta={"digest": digest}),
        "experiment": RUN_NAME,
        "transfer_role": "source",
        "transfer_classes": ",".join(map(str, task.classes)),
    }
    result = train_tracked(
        config,
        tensors,
        data_meta={"digest": digest, "num_classes": task.num_classes},
        experiment_id=experiment_id,
        run_name=RUN_NAME,
        member=Member(replica=0, index=0, seed=config.seed),
        checkpoint_dir=checkpoints,
        tags=tags,
    )
    test_images, test_labels = task_tensors(task.test, mean, std)
    logits = evaluate_logits(
        result.model, test_images, config.train.eval_batch_size, config.train.precision
    )
    test_loss, test_acc = loss_and_accuracy(torch.log_softmax(logits, dim=1), test_labels)
    tracking.log_metrics(result.run_id, {"test_acc": test_acc, "test_loss": test_loss})
    history = result.fit.history
    write_torch(
        model_file,
        {
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
            "run_id": result.run_id,
            "mlflow_experiment_id": experiment_id,
        },
    )
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
    write_json(metrics_file, summary)
    return {"stage": "pretrain", "model": str(model_file), **summary}
