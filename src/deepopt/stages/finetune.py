"""The ``finetune`` stage (transfer/dvc.yaml): fine-tune the pretrained network on
transfer.target per seed x size x mode; write finetune.json, transfer/report.md (mean and
interval per size x mode, the claim's verdict) and its plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params
from deepopt.figures import png_bytes
from deepopt.files import check_writable, write_bytes, write_json, write_text
from deepopt.transfer import load_task, task_tensors
from deepopt.transfer.report import accuracy_figure, render_report
from deepopt.transfer.runs import check_source, finetune_config, finetune_target, load_pretrained

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    transfer = params.transfer
    config = finetune_config(params)
    device = devices.start_device(  # before any CUDA tensor; refused at once when not there
        config.train.device,
        config.train.precision,
        deterministic=config.train.deterministic,
        tf32=config.train.tf32,
    )
    model_file = paths.transfer_model_path()
    metrics_file, report_file, plot_file = outputs = (
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
        train_per_class=None,  # the pool every seed draws its labelled images from
        val_per_class=transfer.val_per_class,
        seed=params.seed,
        key="transfer.target",
    )
    check_source(source, config, task, model_file)
    mean, std = float(source["mean"]), float(source["std"])
    val, test = (
        (images.to(device), labels.to(device))
        for images, labels in (
            task_tensors(task.val, mean, std),
            task_tensors(task.test, mean, std),
        )
    )
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    summary = finetune_target(
        config,
        transfer,
        source,
        task,
        model_file=model_file,
        val=val,
        test=test,
        experiment_id=experiment_id,
        checkpoints=checkpoints,
    )
    runs = summary["runs"]
    write_json(metrics_file, summary)
    write_bytes(plot_file, png_bytes(lambda: accuracy_figure(runs)))
    write_text(report_file, render_report(summary, plot_file.name))
    return {
        "stage": "finetune",
        "report": str(report_file),
        "test_acc": {f"{r['mode']}/{r['per_class']}/{r['seed']}": r["test_acc"] for r in runs},
    }
