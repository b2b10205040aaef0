"""The ``train`` stage: train an experiment's members, checkpoint every epoch, record in MLflow.

An experiment trains ``matrix.seeds`` replicas of ``train.ensemble`` members each; every
member is one MLflow run (run name = experiment name) and has its own checkpoint, so a
killed stage resumes where it stopped and ends with exactly the metrics of an uninterrupted
run. ``train_tracked`` is the one code path that trains and records a network: the tune
stage calls it for each trial.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepopt import distributed, paths, tracking
from deepopt.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from deepopt.config import (
    Params,
    RunConfig,
    apply_overrides,
    load_overrides,
    resolve_experiment,
)
from deepopt.data import PreparedData, load_prepared, normalize
from deepopt.errors import ConfigError, DivergedError
from deepopt.files import check_writable, write_json, write_text, write_torch
from deepopt.models import build_model, set_training_layout
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training import EarlyStopping, FitResult, LoopState, fit, steps_per_epoch

__all__ = [
    "BASE_EXPERIMENT",
    "Member",
    "MemberResult",
    "main",
    "members_of",
    "run_config",
    "split_tensors",
    "train_tracked",
]

BASE_EXPERIMENT = "base"  # the name of the run config without any experiment applied


@dataclass(frozen=True)
class Member:
    replica: int  # which of matrix.seeds repetitions
    index: int  # which ensemble member within the replica
    seed: int


@dataclass(frozen=True)
class MemberResult:
    member: Member
    run_id: str
    fit: FitResult
    model: nn.Module


def members_of(config: RunConfig, replicas: int) -> list[Member]:
    """Replica r, member k trains with seed + r * ensemble + k."""
    size = config.train.ensemble
    return [
        Member(replica=r, index=k, seed=config.seed + r * size + k)
        for r in range(replicas)
        for k in range(size)
    ]


def split_tensors(
    data: PreparedData, precision: str, fit_on: str = "train"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float images and labels, once per stage (one vectorized op per split).

    With ``fit_on="train+val"`` the validation images are appended to "train"; "val" stays
    for the per-epoch report, which is then no longer a held-out measurement.

    The images stay NCHW for both precisions: the network's own weights decide where
    activations turn channels_last (``models.set_training_layout``). With bf16 autocast a
    channels_last network trained slower here with torch 2.14 (lecture CNN 0.76 vs 0.68 s
    per epoch, ResNet-20 0.96 vs 0.55 s; benchmarks/bench_train.py measures it as
    contender g). ``precision`` stays in the signature for the callers.
    """
    tensors = {
        name: (normalize(split.images, data.mean, data.std), split.labels)
        for name, split in (("train", data.train), ("val", data.val))
    }
    if fit_on == "train+val":
        (train_x, train_y), (val_x, val_y) = tensors["train"], tensors["val"]
        tensors["train"] = (torch.cat([train_x, val_x]), torch.cat([train_y, val_y]))
    return tensors


def _progress(label: str, epochs: int) -> Callable[[LoopState], None]:
    """One plain line per epoch on stderr (a log under CI and DVC alike)."""

    def report(state: LoopState) -> None:
        r = state.history[-1]
        print(
            f"[{label}] epoch {state.epochs_done}/{epochs} loss {r['loss']:.4f} acc {r['acc']:.4f} "
            f"val_loss {r['val_loss']:.4f} val_acc {r['val_acc']:.4f} lr {r['lr']:.3g} "
            f"{r['seconds']:.2f}s",
            file=sys.stderr,
            flush=True,
        )

    return report


def train_tracked(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    data_meta: dict[str, Any],
    experiment_id: str,
    run_name: str,
    member: Member,
    checkpoint_dir: Path,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    on_epoch: Callable[[LoopState], None] | None = None,
    parallel: distributed.ProcessGroup | None = None,
    setup: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
) -> MemberResult:
    """Train one member with checkpoints and MLflow; raise DivergedError on NaN loss.

    A checkpoint of the same config, seed and data is continued (or, when finished,
    reused); its MLflow run is continued too, and epochs the tracking store lost to a
    kill are logged again. ``on_epoch`` runs after the checkpoint and the logging (tune's
    pruning hook raises from it). With ``parallel`` this is rank 0 of a torchrun job; the
    other processes run ``_follow`` alongside. ``setup`` takes the freshly built network
    (e.g. loads pretrained weights, freezes layers) and returns the optimizer's param groups.
    """
    world_size = parallel.world_size if parallel is not None else 1
    path = checkpoint_file(checkpoint_dir, config, member.seed, data_meta["digest"], world_size)
    saved = load_checkpoint(path)
    previous_run = saved.get("run_id") if saved else None
    if previous_run is not None and not tracking.run_exists(previous_run):
        previous_run = None  # not in this store (deleted, another store): a new run
    if saved is not None and saved.get("finished"):
        if previous_run is not None:
            _share_start(parallel, saved)
            # Trained before with this config, seed and data: the same network again, and
            # its MLflow run stays as it ended.
            model = _new_model(config, tensors, data_meta)
            model.load_state_dict(_kept_weights(saved["loop"], config))
            result = _finished_result(saved["loop"], config)
            return MemberResult(member=member, run_id=previous_run, fit=result, model=model)
        saved = None  # its run is gone: train anew and record a complete run
    _share_start(parallel, saved)
    run_id = tracking.start_run(
        experiment_id,
        run_name,
        run_id=previous_run,
        parent_run_id=parent_run_id,
        tags={
            **(tags or {}),
            "seed": str(member.seed),
            "member": str(member.index),
            "replica": str(member.replica),
        },
    )

    latest: list[LoopState] = []  # the state after the last epoch trained here

    def after_epoch(state: LoopState) -> None:
        latest[:] = [state]
        save_checkpoint(path, {"loop": state.to_dict(), "run_id": run_id, "finished": False})
        record = state.history[-1]
        tracking.log_epoch(
            run_id, state.epochs_done - 1, {k: v for k, v in record.items() if k != "epoch"}
        )
        progress(state)
        if on_epoch is not None:
            on_epoch(state)

    # From here on every way out ends the run (KILLED on Ctrl-C/SIGTERM): none stays RUNNING.
    with tracking.ending_run(run_id):
        tracking.log_params(run_id, {**config.model_dump(mode="json"), "seed": member.seed})
        images, labels = tensors["train"]
        tracking.log_dataset(
            run_id,
            f"{config.data.name}-train",
            images.numpy(),
            labels.numpy(),
            source=str(paths.prepared_split_path("train")),
            digest=data_meta["digest"][:36],
        )
        start = LoopState.from_dict(saved["loop"]) if saved else None
        if start is not None:
            _relog_missing_epochs(run_id, start.history)

        progress = _progress(f"{run_name} seed {member.seed}", config.train.epochs)
        model, result = _fit_member(
            config, tensors, data_meta, member.seed, start, after_epoch, parallel, setup
        )
        if result.stop_reason == "diverged":
            reason = f"loss became NaN/inf in epoch {result.epochs_run + 1}"
            tracking.set_tags(run_id, {"stop_reason": "diverged"})
            tracking.end_run(run_id, "FAILED", reason=reason)
            raise DivergedError(
                f"{run_name} (seed {member.seed}) diverged: {reason}; try a lower optim.lr"
            )
        _log_run_end(run_id, config, model, result, tensors["val"][0][:5])
        # The whole last state (optimizer and RNGs too): a tune retry can continue it.
        final = latest[0] if latest else start
        loop = final.to_dict() if final is not None else _final_state(result, model)
        save_checkpoint(path, {"loop": loop, "run_id": run_id, "finished": True})
    return MemberResult(member=member, run_id=run_id, fit=result, model=model)


def _fit_member(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_meta: dict[str, Any],
    seed: int,
    start: LoopState | None,
    on_epoch_end: Callable[[LoopState], None] | None,
    parallel: distributed.ProcessGroup | None,
    setup: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
) -> tuple[nn.Module, FitResult]:
    """Build the member's network, optimizer and schedule and train it (every process of
    a torchrun job runs this with the same arguments, rank 0 with its callback)."""
    torch.manual_seed(seed)  # weight init
    model = _new_model(config, tensors, data_meta)
    set_training_layout(model, config.train.precision)
    optimizer = build_optimizer(
        setup(model) if setup is not None else model.parameters(), config.optim
    )
    world_size = parallel.world_size if parallel is not None else 1
    steps = steps_per_epoch(len(tensors["train"][0]), config.train.batch_size, world_size)
    schedule = build_schedule(
        optimizer, config.schedule, epochs=config.train.epochs, steps_per_epoch=steps
    )
    result = fit(
        model,
        optimizer,
        schedule,
        tensors["train"],
        tensors["val"],
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        early_stop=config.early_stop,
        seed=seed,
        eval_batch_size=config.train.eval_batch_size,
        precision=config.train.precision,
        diagnostics=config.train.diagnostics,
        start=start,
        on_epoch_end=on_epoch_end,
        parallel=parallel,
    )
    # Back to NCHW: the saved, logged and exported weights (torch.export's pt2 archive
    # expects contiguous ones) are the same bytes whichever layout trained them.
    model.to(memory_format=torch.contiguous_format)
    return model, result


def _share_start(parallel: distributed.ProcessGroup | None, saved: dict[str, Any] | None) -> None:
    """Under torchrun, the other processes start (or skip) the member where rank 0 does."""
    if parallel is not None:
        parallel.broadcast(saved)


def _follow(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    data_meta: dict[str, Any],
    member: Member,
    parallel: distributed.ProcessGroup,
) -> None:
    """A process of rank > 0: trains its shards in step with rank 0, which decides where
    to start (its checkpoint) and alone writes checkpoints, outputs and MLflow records."""
    saved: dict[str, Any] | None = parallel.broadcast(None)
    if saved is not None and saved.get("finished"):
        return
    start = LoopState.from_dict(saved["loop"]) if saved else None
    _, result = _fit_member(config, tensors, data_meta, member.seed, start, None, parallel)
    if result.stop_reason == "diverged":
        raise DivergedError(f"rank {parallel.rank}: seed {member.seed} diverged with rank 0")


def _new_model(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_meta: dict[str, Any],
) -> nn.Module:
    image_shape = tuple(tensors["train"][0].shape[1:])
    return build_model(config.model, image_shape=image_shape, num_classes=data_meta["num_classes"])  # type: ignore[arg-type]


def _finished_result(loop: dict[str, Any], config: RunConfig) -> FitResult:
    """The FitResult of a finished member, from its history (pure): a run shorter than
    train.epochs stopped early; the best epoch is replayed with the early-stopping rule."""
    history = list(loop["history"])
    stopper = EarlyStopping(config.early_stop)
    for record in history:
        stopper.update(int(record["epoch"]), record)
    return FitResult(
        history=history,
        epochs_run=len(history),
        stop_reason="max_epochs" if len(history) >= config.train.epochs else "early_stop",
        best_epoch=stopper.best_epoch,
        train_seconds=sum(record["seconds"] for record in history),
    )


def _kept_weights(loop: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The weights a finished member ended with: its best epoch's with restore_best."""
    best = loop.get("best_model")
    weights: dict[str, Any] = best if config.early_stop.restore_best and best else loop["model"]
    return weights


def _final_state(result: FitResult, model: nn.Module) -> dict[str, Any]:
    return LoopState(
        epochs_done=result.epochs_run, history=result.history, model=model.state_dict()
    ).to_dict()


def _relog_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    logged = tracking.logged_epochs(run_id, "val_loss")
    for record in history:
        if int(record["epoch"]) not in logged:
            tracking.log_epoch(
                run_id, int(record["epoch"]), {k: v for k, v in record.items() if k != "epoch"}
            )


def _log_run_end(
    run_id: str, config: RunConfig, model: nn.Module, result: FitResult, example: torch.Tensor
) -> None:
    from deepopt.plots import plot_history, plt

    summary = {
        "epochs_run": result.epochs_run,
        "stop_reason": result.stop_reason,
        "best_epoch": result.best_epoch,
    }
    tracking.set_tags(run_id, {k: str(v) for k, v in summary.items()})
    tracking.log_metrics(
        run_id, {"epochs_run": result.epochs_run, "train_seconds": result.train_seconds}
    )
    figure = plot_history(
        result.history, title=f"{config.model.name} / {config.optim.name} / {config.schedule.name}"
    )
    tracking.log_figure(run_id, figure, "history.png")
    plt.close(figure)
    tracking.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    if config.mlflow.log_model:
        tracking.log_model(run_id, model.float().eval(), example.float().numpy())
    tracking.end_run(run_id, "FINISHED")


def history_csv(history: list[dict[str, float]]) -> str:
    """The per-epoch history as CSV, for `dvc plots show`."""
    columns = ["epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds"]
    # Diagnostics columns in forward (layer) order, as the loop recorded them.
    extra = [k for k in dict.fromkeys(k for record in history for k in record) if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + extra, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({**record, "epoch": int(record["epoch"])})
    return buffer.getvalue()


def _summary(results: list[MemberResult]) -> dict[str, Any]:
    runs = []
    for result in results:
        history = result.fit.history
        runs.append(
            {
                "seed": result.member.seed,
                "epochs_run": result.fit.epochs_run,
                "stop_reason": result.fit.stop_reason,
                "best_val_acc": max(r["val_acc"] for r in history),
                "best_val_loss": min(r["val_loss"] for r in history),
                "final_val_acc": history[-1]["val_acc"],
                "final_val_loss": history[-1]["val_loss"],
                "train_seconds": sum(r["seconds"] for r in history),
            }
        )
    first = runs[0]
    return {**first, "runs": runs} if len(runs) > 1 else first


def run_config(params: Params, experiment: str | None, overrides: Path | None) -> RunConfig:
    """The experiment's config with an overrides file (e.g. params/best.yaml) on top.

    With a file, an ``experiment`` that params.yaml does not define only names the outputs
    and the file applies to the base config.
    """
    if overrides is None:
        return resolve_experiment(params, experiment)
    start = (
        resolve_experiment(params, experiment)
        if experiment in params.experiments
        else params.base_run()
    )
    changes = load_overrides(overrides)
    try:
        return apply_overrides(start, changes)
    except ConfigError as err:
        raise ConfigError(f"{overrides}: {err}") from None


def main(
    params: Params,
    experiment: str | None = None,
    overrides: Path | None = None,
    **_: object,
) -> dict[str, Any]:
    name = experiment or (Path(overrides).stem if overrides else BASE_EXPERIMENT)
    config = run_config(params, experiment, overrides)
    # Under torchrun: one of WORLD_SIZE processes; only rank 0 writes and records.
    parallel = distributed.join_from_env(config.train.sync_batchnorm)
    if parallel is None or parallel.is_main:
        check_writable(
            paths.model_path(name),
            paths.run_info_path(name),
            paths.train_metrics_path(name),
            paths.history_path(name),
            paths.checkpoint_dir(config.train.checkpoint_dir, name) / "member.pt",  # any
        )
    data = load_prepared(config.data, config.seed)
    torch.set_num_threads(config.train.threads or distributed.default_threads())
    tensors = split_tensors(data, config.train.precision, config.train.fit_on)
    if parallel is not None and not parallel.is_main:
        for member in members_of(config, params.matrix.seeds):
            _follow(config, tensors, data_meta=data.meta, member=member, parallel=parallel)
        return {"experiment": name, "rank": parallel.rank}
    tracking.configure()
    experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
    tags = {
        **tracking.run_tags(dataset=config.data.name, meta=data.meta),
        "experiment": name,
        "fit_on": config.train.fit_on,
    }
    if params.experiments:
        tags["matrix"] = config.mlflow.experiment
    if parallel is not None:
        tags["world_size"] = str(parallel.world_size)  # global batch: world_size x batch_size
    results = [
        train_tracked(
            config,
            tensors,
            data_meta=data.meta,
            experiment_id=experiment_id,
            run_name=name,
            member=member,
            checkpoint_dir=paths.checkpoint_dir(config.train.checkpoint_dir, name),
            tags=tags,
            parallel=parallel,
        )
        for member in members_of(config, params.matrix.seeds)
    ]
    model_file = paths.model_path(name)
    write_torch(
        model_file,
        {
            "experiment": name,
            "model_config": config.model.model_dump(mode="json"),
            "image_shape": list(tensors["train"][0].shape[1:]),
            "num_classes": data.num_classes,
            "members": [
                {
                    "seed": r.member.seed,
                    "replica": r.member.replica,
                    "index": r.member.index,
                    "state_dict": r.model.state_dict(),
                }
                for r in results
            ],
        },
    )
    write_json(
        paths.run_info_path(name),
        {
            "experiment": name,
            "mlflow_experiment_id": experiment_id,
            "runs": [
                {
                    "seed": r.member.seed,
                    "replica": r.member.replica,
                    "index": r.member.index,
                    "run_id": r.run_id,
                }
                for r in results
            ],
        },
    )
    summary = _summary(results)
    write_json(paths.train_metrics_path(name), summary)
    write_text(paths.history_path(name), history_csv(results[0].fit.history))
    return {
        "experiment": name,
        "model": str(model_file),
        **{k: v for k, v in summary.items() if k != "runs"},
    }
