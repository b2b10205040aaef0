"""The ``compare-seeds`` stage (compare/dvc.yaml): every compared optimizer over
compare.seeds seeds, at its Keras defaults (``--settings default``) or at its study's best
trial (``--settings tuned``, from compare/best/<optimizer>.yaml); each seed tested;
compare/runs/<settings>.json."""

from __future__ import annotations

from typing import Any

import torch

from deepopt import devices, paths, tracking
from deepopt.compare.seeds import compared_seed, train_seeds
from deepopt.config import Params, RunConfig, apply_overrides, load_overrides, resolve_compare
from deepopt.data import load_prepared, normalize
from deepopt.errors import ConfigError
from deepopt.files import check_writable, write_json
from deepopt.training import distributed
from deepopt.training.member import normalized_splits

__all__ = ["SETTINGS", "main", "settings_config"]

SETTINGS = ("default", "tuned")


def settings_config(params: Params, optimizer: str, settings: str) -> RunConfig:
    """``optimizer``'s run config at ``settings``: its defaults, or those with its study's
    best trial (compare/best/<optimizer>.yaml, written by compare-tune) applied."""
    config = resolve_compare(params, optimizer)
    if settings == "default":
        return config
    best = paths.compare_best_path(optimizer)
    if not best.exists():
        raise ConfigError(
            f"{best}: not found; run `deepopt compare-tune` (or `dvc repro compare/dvc.yaml`) "
            f"before `deepopt compare-seeds --settings tuned`"
        )
    return apply_overrides(config, load_overrides(best), prefix=str(best))


def main(params: Params, settings: str = "default", **_: object) -> dict[str, Any]:
    if settings not in SETTINGS:
        raise ConfigError(f"--settings: {settings!r} is not one of {', '.join(SETTINGS)}")
    compare = params.compare
    configs = {name: settings_config(params, name, settings) for name in compare.optimizers}
    first = next(iter(configs.values()))  # the optimizers share the network, data and device
    device = devices.start_device(  # before any CUDA tensor; refused at once when not there
        first.train.device,
        first.train.precision,
        deterministic=first.train.deterministic,
        tf32=first.train.tf32,
    )
    output = paths.compare_runs_path(settings)
    folders = {
        name: paths.compare_checkpoint_dir(first.train.checkpoint_dir, f"{name}-{settings}")
        for name in configs
    }
    check_writable(output, *(folder / "member.pt" for folder in folders.values()))
    data = load_prepared(first.data, first.seed)
    torch.set_num_threads(first.train.threads or distributed.default_threads())
    tensors = normalized_splits(data, "train", device)
    test = (
        normalize(data.test.images.to(device), data.mean, data.std),
        data.test.labels.to(device),
    )
    tracking.configure()
    experiment_id = tracking.ensure_experiment(compare.mlflow_experiment)
    tags = {
        **tracking.run_tags(dataset=first.data.name, meta=data.meta, device=device),
        "compare": "true",
    }
    optimizers = {
        name: train_seeds(
            config,
            tensors,
            test,
            optimizer=name,
            settings=settings,
            seeds=compare.seeds,
            data_meta=data.meta,
            experiment_id=experiment_id,
            checkpoint_dir=folders[name],
            tags=tags,
        )
        for name, config in configs.items()
    }
    write_json(
        output,
        {
            "settings": settings,
            "dataset": first.data.name,
            "model": first.model.name,
            "epochs": compare.epochs,
            "seeds": [compared_seed(first.seed, replica) for replica in range(compare.seeds)],
            "optimizers": optimizers,
        },
    )
    return {
        "stage": "compare-seeds",
        "settings": settings,
        "output": str(output),
        "test_acc": {
            name: [run["test_acc"] for run in entry["runs"]] for name, entry in optimizers.items()
        },
    }
