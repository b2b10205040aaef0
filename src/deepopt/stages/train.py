"""The ``train`` stage: train an experiment's members (``matrix.seeds`` replicas of
``train.ensemble`` each, one MLflow run apiece) and write model.pt, run.json and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.config import Params, config_hash, resolve_run, run_name
from deepopt.data import load_prepared
from deepopt.files import LockedError, check_writable, write_json, write_text, write_torch
from deepopt.stats import interval_metrics
from deepopt.training import distributed
from deepopt.training.member import (
    follow_member,
    normalized_splits,
    train_tracked,
)
from deepopt.training.outputs import (
    history_csv,
    model_file,
    replica_values,
    run_info,
    runs_csv,
    train_summary,
)
from deepopt.training.seeds import member_run_name, members_of

__all__ = ["main"]


def main(
    params: Params,
    experiment: str | None = None,
    overrides: Path | None = None,
    **_: object,
) -> dict[str, Any]:
    name = run_name(experiment, overrides, paths.BASE_EXPERIMENT)  # checked: a path part
    config = resolve_run(params, experiment, overrides)
    # Before any CUDA tensor (CUBLAS_WORKSPACE_CONFIG); refused at once when not there.
    device = devices.start_device(
        config.train.device,
        config.train.precision,
        deterministic=config.train.deterministic,
        tf32=config.train.tf32,
    )
    # Under torchrun: one of WORLD_SIZE processes; only rank 0 writes and records.
    parallel = distributed.join_from_env(config.train.sync_batchnorm, config.train.device)
    if parallel is not None:
        device = parallel.device  # cuda:LOCAL_RANK on CUDA
    checkpoints = paths.checkpoint_dir(config.train.checkpoint_dir, name)
    if parallel is None or parallel.is_main:
        outputs = (
            paths.model_path(name),
            paths.run_info_path(name),
            paths.history_path(name),
            paths.runs_history_path(name),
        )
        check_writable(*outputs, paths.train_metrics_path(name), checkpoints / "member.pt")
    data = load_prepared(config.data, config.seed)
    torch.set_num_threads(config.train.threads or distributed.default_threads())
    tensors = normalized_splits(data, config.train.fit_on, device)
    members = members_of(config, params.matrix.seeds)
    if parallel is not None and not parallel.is_main:
        for member in members:
            follow_member(config, tensors, data_meta=data.meta, member=member, parallel=parallel)
        return {"experiment": name, "rank": parallel.rank}
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    tags = {
        **tracking.run_tags(dataset=config.data.name, meta=data.meta, device=device),
        "experiment": name,
        "fit_on": config.train.fit_on,
    }
    if params.experiments:
        tags["matrix"] = config.mlflow.experiment
    if parallel is not None:
        tags["world_size"] = str(parallel.world_size)  # global batch: world_size x batch_size
    # One parent run per experiment, its seed runs nested under it (same config and data:
    # the same parent again); it gets the mean and interval of the final metrics.
    # (The device is not part of it: runs resumed on another device nest under it too.)
    anywhere = config.model_copy(
        update={"train": config.train.model_copy(update={"device": "auto"})}
    )
    replicas = params.matrix.seeds  # another count of seeds: another parent (its n differs)
    parent_key = f"{name}-{config_hash(anywhere, 16)}-{data.meta['digest'][:12]}-{replicas}"
    # Refused by another training of these seeds (LockedError): the parent is that one's.
    with tracking.experiment_run(
        experiment_id, name, key=parent_key, tags=tags, keep_on=(LockedError,)
    ) as parent:
        parent_params = config.model_dump(mode="json")
        parent_params["train"].pop("device")
        tracking.log_params(parent, parent_params)
        replica_seeds = ",".join(str(m.seed) for m in members if m.index == 0)
        tracking.set_tags(parent, {"seeds": replica_seeds, "replicas": str(params.matrix.seeds)})
        results = [
            train_tracked(
                config,
                tensors,
                data_meta=data.meta,
                experiment_id=experiment_id,
                run_name=name,
                mlflow_name=member_run_name(name, member, config.train.ensemble),
                member=member,
                checkpoint_dir=checkpoints,
                tags={**tags, tracking.ROLE_TAG: "seed"},
                parent_run_id=parent,
                parallel=parallel,
            )
            for member in members
        ]
        summary = train_summary(results)
        tracking.log_metrics(parent, interval_metrics(replica_values(summary)))
    model_config = config.model.model_dump(mode="json")
    image_shape = tensors["train"][0].shape[1:]
    content = model_file(name, model_config, image_shape, data.num_classes, results)
    write_torch(paths.model_path(name), content)
    write_json(paths.run_info_path(name), run_info(name, experiment_id, results, parent))
    write_json(paths.train_metrics_path(name), summary)
    write_text(paths.history_path(name), history_csv(results[0].fit.history))
    write_text(paths.runs_history_path(name), runs_csv(results))
    return {
        "experiment": name,
        "model": str(paths.model_path(name)),
        **{k: v for k, v in summary.items() if k != "runs"},
    }
