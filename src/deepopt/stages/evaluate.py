"""The ``evaluate`` stage: eval.json and replica 0's confusion/misclassified PNGs from
model.pt and the test split; test metrics and figures into MLflow (deepopt.evaluation)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params, resolve_run, run_name
from deepopt.data import image_shape, load_prepared, normalize
from deepopt.evaluation import (
    check_runs_exist,
    check_shapes,
    eval_summary,
    evaluate_replicas,
    load_run_ids,
    load_trained,
    log_to_mlflow,
    parent_run_id,
    replica_metrics,
    replica_pngs,
)
from deepopt.files import check_writable, write_bytes, write_json

__all__ = ["main"]


def main(
    params: Params,
    experiment: str | None = None,
    overrides: Path | None = None,
    **_: object,
) -> dict[str, Any]:
    name = run_name(experiment, overrides, paths.BASE_EXPERIMENT)  # checked: a path part
    config = resolve_run(params, experiment, overrides)  # the config train used
    device = devices.start_device(
        config.train.device,
        config.train.precision,
        deterministic=config.train.deterministic,
        tf32=config.train.tf32,
    )
    plots = paths.plots_dir(name)
    check_writable(
        paths.eval_metrics_path(name), plots / "confusion.png", plots / "misclassified.png"
    )
    trained = load_trained(paths.model_path(name), name)
    experiment_id, run_ids = load_run_ids(paths.run_info_path(name), trained)
    data = load_prepared(config.data, config.seed)
    check_shapes(trained, data.num_classes, image_shape(data.test.images))
    tracking.configure()
    parent = parent_run_id(paths.run_info_path(name))
    check_runs_exist([*run_ids.values(), *([parent] if parent else [])], paths.run_info_path(name))

    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tic = time.perf_counter()
    images = normalize(data.test.images.to(device), data.mean, data.std)  # [N, C, H, W]
    results = evaluate_replicas(
        trained, images, data.test.labels, config.train.eval_batch_size, config.train.precision
    )
    eval_seconds = time.perf_counter() - tic

    labels, names = data.test.labels, data.class_names
    summary = eval_summary(name, results, labels, names)
    pngs = {r.replica: replica_pngs(r, data.test.images, labels, names, name) for r in results}
    write_json(paths.eval_metrics_path(name), summary)
    for artifact_file, blob in pngs[results[0].replica].items():
        write_bytes(plots / artifact_file, blob)
    run_tags = tracking.run_tags(dataset=config.data.name, meta=data.meta, device=device)
    tags = {**run_tags, "experiment": name}
    logged = log_to_mlflow(
        trained=trained,
        experiment_id=experiment_id,
        run_ids=run_ids,
        metrics={r.replica: replica_metrics(r, labels, names) for r in results},
        pngs=pngs,
        results=results,
        tags=tags,
        parent_run_id=parent,
    )
    std = {"test_acc_std": summary["test_acc_std"]} if "test_acc_std" in summary else {}
    return {
        "experiment": name,
        "test_acc": summary["test_acc"],
        "test_loss": summary["test_loss"],
        **std,
        "eval_seconds": eval_seconds,
        "mlflow_runs": logged,
        "outputs": [str(paths.eval_metrics_path(name)), str(plots)],
    }
