"""The ``lr-find`` stage: the learning-rate range test (deepopt.training.lr_find) on an
experiment's network, optimizer and batches, before any training; writes the suggestion
(lr_find/<name>.json), the curve (.csv) and its plot (.png), and records all three in one
MLflow run tagged ``deepopt.role=lr_find``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params, resolve_run, run_name
from deepopt.data import load_prepared
from deepopt.figures import plot_lr_find, png_bytes
from deepopt.files import check_writable, write_bytes, write_json, write_text
from deepopt.models import set_training_layout
from deepopt.optim import build_optimizer
from deepopt.training import distributed
from deepopt.training.lr_find import RangeTest, lr_range_test
from deepopt.training.member import initial_model, normalized_splits

__all__ = ["ROLE", "main"]

ROLE = "lr_find"  # `mlflow ui`: tags.`deepopt.role` = 'lr_find'


def main(params: Params, experiment: str | None = None, **_: object) -> dict[str, Any]:
    name = run_name(experiment, None, paths.BASE_EXPERIMENT)  # checked: a file name
    config = resolve_run(params, experiment, None)  # an unknown experiment: ConfigError
    settings = params.lr_find
    outputs = [
        paths.lr_find_metrics_path(name),
        paths.lr_find_curve_path(name),
        paths.lr_find_plot_path(name),
    ]
    check_writable(*outputs)
    device = devices.start_device(
        config.train.device,
        config.train.precision,
        deterministic=config.train.deterministic,
        tf32=config.train.tf32,
    )
    data = load_prepared(config.data, config.seed)
    torch.set_num_threads(config.train.threads or distributed.default_threads())
    tensors = normalized_splits(data, config.train.fit_on, device)
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    tags = {
        **tracking.run_tags(dataset=config.data.name, meta=data.meta, device=device),
        "experiment": name,
        tracking.ROLE_TAG: ROLE,
    }
    with tracking.tracked_run(experiment_id, f"{name} lr_find", tags=tags) as run_id:
        tracking.log_params(run_id, {**config.model_dump(mode="json"), ROLE: settings.model_dump()})
        model = initial_model(config, tensors, data.meta, config.seed).to(device)
        set_training_layout(model, config.train.precision, device)
        test = lr_range_test(
            model,
            build_optimizer(model.parameters(), config.optim),
            tensors["train"],
            batch_size=config.train.batch_size,
            seed=config.seed,
            precision=config.train.precision,
            **settings.model_dump(),
        )
        summary = {
            "experiment": name,
            "optimizer": config.optim.name,
            "batch_size": config.train.batch_size,
            "lr_used": config.optim.lr,  # the experiment's optim.lr
            "base_lr": params.optim.lr,  # the base config's, which the matrix starts from
            **_summary(test),
            **settings.model_dump(),
            "run_id": run_id,
        }
        write_json(outputs[0], summary)
        write_text(outputs[1], _curve_csv(test))
        title = (
            f"{name}: {config.model.name} / {config.optim.name}, batch {config.train.batch_size}"
        )
        figure = functools.partial(
            plot_lr_find,
            test.lrs,
            test.losses,
            suggestion_step=test.suggestion_step,
            lr_used=config.optim.lr,
            title=title,
        )
        write_bytes(outputs[2], png_bytes(figure))  # drawn in the pinned style
        _record(run_id, test, outputs)
    return {"stage": "lr_find", **{k: summary[k] for k in ("experiment", "suggestion", "lr_used")}}


def _record(run_id: str, test: RangeTest, outputs: list[Path]) -> None:
    """The curve as metrics by step (step = batch), the suggestion, and the three files."""
    tracking.log_series(run_id, {"lr": test.lrs, "loss": test.losses})
    if test.suggestion is not None:
        tracking.log_metrics(run_id, {"suggested_lr": test.suggestion})
    tracking.set_tags(run_id, {"stop_reason": test.stop_reason})
    for output in outputs:
        tracking.log_artifact(run_id, output)


def _summary(test: RangeTest) -> dict[str, Any]:
    """The JSON's numbers of the test: the suggestion (null when too few batches ran to
    suggest from), where the loss was lowest, how many batches ran and why it stopped."""
    step = test.suggestion_step
    lowest = min(range(len(test.losses)), key=test.losses.__getitem__, default=None)
    return {
        "suggestion": test.suggestion,
        "suggestion_loss": None if step is None else test.losses[step],
        "min_loss": None if lowest is None else test.losses[lowest],
        "min_loss_lr": None if lowest is None else test.lrs[lowest],
        "batches": len(test.lrs),
        "stop_reason": test.stop_reason,
    }


def _curve_csv(test: RangeTest) -> str:
    rows = ["step,lr,loss"]
    rows += [
        f"{step},{lr!r},{loss!r}"
        for step, (lr, loss) in enumerate(zip(test.lrs, test.losses, strict=True))
    ]
    return "\n".join(rows) + "\n"
