"""An optimizer's seeds in the compare pipeline, at its default or its tuned settings: each
seed trained (checkpointed, one MLflow run, nested under one parent run per optimizer and
settings) and then tested; a seed that diverges is recorded as such, not as a failure of
the stage (it is a result about the optimizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepopt import tracking
from deepopt.config import RunConfig, config_hash
from deepopt.errors import DivergedError
from deepopt.files import LockedError
from deepopt.stats import interval_metrics
from deepopt.training.member import log_test_metrics, train_tracked
from deepopt.training.seeds import Member

__all__ = ["compared_seed", "compared_settings", "train_seeds"]

Tensors = tuple[torch.Tensor, torch.Tensor]


def compared_seed(seed: int, replica: int) -> int:
    """Replica r's seed: seed + 1 + r. The studies' trials train with ``seed`` itself, so no
    tuned run replays the very trial it was picked from (its validation score chosen as the
    best of the budget would bias the tuned mean upwards)."""
    return seed + 1 + replica


def compared_settings(config: RunConfig) -> dict[str, Any]:
    """What differs between the optimizers' runs: the optim and schedule sections, their
    unset knobs left out (runs/<settings>.json's ``config``)."""
    return {
        section: {
            k: v
            for k, v in getattr(config, section).model_dump(mode="json").items()
            if v is not None
        }
        for section in ("optim", "schedule")
    }


def train_seeds(
    config: RunConfig,
    tensors: dict[str, Tensors],
    test: Tensors,
    *,
    optimizer: str,
    settings: str,
    seeds: int,
    data_meta: dict[str, Any],
    experiment_id: str,
    checkpoint_dir: Path,
    tags: dict[str, str],
) -> dict[str, Any]:
    """``seeds`` trainings of ``config`` (``compared_seed``: replica r gets the same data
    order and initial weights as replica r of every other optimizer, so they pair by seed), each
    tested on ``test``; runs/<settings>.json's entry of ``optimizer``."""
    name = f"{optimizer} {settings}"
    key = f"compare-{optimizer}-{settings}-{config_hash(config, 16)}-{data_meta['digest'][:12]}"
    own_tags = {**tags, "optimizer": optimizer, "compare_settings": settings}
    runs: list[dict[str, Any]] = []
    with tracking.experiment_run(
        experiment_id, name, key=f"{key}-{seeds}", tags=own_tags, keep_on=(LockedError,)
    ) as parent:
        tracking.log_params(parent, config.model_dump(mode="json"))
        for replica in range(seeds):
            member = Member(replica=replica, index=0, seed=compared_seed(config.seed, replica))
            record: dict[str, Any] = {"seed": member.seed, "replica": replica}
            try:
                result = train_tracked(
                    config,
                    tensors,
                    data_meta=data_meta,
                    experiment_id=experiment_id,
                    run_name=f"compare {name}",
                    mlflow_name=f"{name} seed {member.seed}",
                    member=member,
                    checkpoint_dir=checkpoint_dir,
                    tags={**own_tags, tracking.ROLE_TAG: "seed"},
                    parent_run_id=parent,
                )
            except DivergedError as err:
                print(f"[compare] {err}; recorded as diverged", flush=True)
                runs.append({**record, "diverged": True, "test_acc": None, "test_loss": None})
                continue
            test_loss, test_acc = log_test_metrics(result, config, test)
            history = result.fit.history
            runs.append(
                {
                    **record,
                    "diverged": False,
                    "test_acc": test_acc,
                    "test_loss": test_loss,
                    "best_val_acc": max(r["val_acc"] for r in history),
                    "epochs_run": result.fit.epochs_run,
                    "train_seconds": round(sum(r["seconds"] for r in history), 3),
                    "stop_reason": result.fit.stop_reason,
                    "run_id": result.run_id,
                    "val_acc": [r["val_acc"] for r in history],
                }
            )
        finished = [run for run in runs if not run["diverged"]]
        values = {
            key: [run[key] for run in finished]
            for key in ("test_acc", "test_loss", "best_val_acc", "epochs_run", "train_seconds")
        }
        if finished:
            tracking.log_metrics(parent, interval_metrics(values))
        tracking.log_metrics(parent, {"diverged_seeds": len(runs) - len(finished)})
    return {"config": compared_settings(config), "parent_run_id": parent, "runs": runs}
