"""One member of an experiment, trained and recorded: checkpoint every epoch, MLflow run.

``train_tracked`` is the one code path that trains and records a network (the train,
tune, pretrain and finetune stages all call it). A member's checkpoint and MLflow run are
continued after a kill, so it ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepopt import files, paths, tracking
from deepopt.config import RunConfig
from deepopt.data import PreparedData, normalize
from deepopt.errors import DivergedError
from deepopt.metrics import loss_and_accuracy
from deepopt.models import build_model, set_portable_layout, set_training_layout
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training.checkpoint import checkpoint_file, resume_checkpoint, save_checkpoint
from deepopt.training.distributed import ProcessGroup
from deepopt.training.early_stopping import EarlyStopping
from deepopt.training.loop import (
    BatchCallback,
    FitResult,
    LoopState,
    evaluate_logits,
    fit,
    steps_per_epoch,
)
from deepopt.training.progress import epoch_bar, epoch_line
from deepopt.training.seeds import Member

__all__ = [
    "MemberResult",
    "fit_member",
    "follow_member",
    "initial_model",
    "log_test_metrics",
    "normalized_splits",
    "train_tracked",
]


@dataclass(frozen=True)
class MemberResult:
    member: Member
    run_id: str
    fit: FitResult
    model: nn.Module


def normalized_splits(
    data: PreparedData, fit_on: str = "train", device: torch.device | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train and val splits as normalized float images and labels on ``device`` (default
    the CPU), once per stage: the uint8 tensors are moved there and normalized there (one
    vectorized op per split); the members then train on the device the tensors are on.

    With ``fit_on="train+val"`` the validation images are appended to "train"; "val" stays
    for the per-epoch report, which is then no longer a held-out measurement. The images
    stay NCHW: the network's own weights decide where activations turn channels_last
    (``models.layout``, measured by benchmarks/bench_train.py as contender g).
    """
    target = device or torch.device("cpu")
    tensors = {
        name: (
            normalize(split.images.to(target), data.mean, data.std),
            split.labels.to(target),
        )
        for name, split in (("train", data.train), ("val", data.val))
    }
    if fit_on == "train+val":
        (train_x, train_y), (val_x, val_y) = tensors["train"], tensors["val"]
        tensors["train"] = (torch.cat([train_x, val_x]), torch.cat([train_y, val_y]))
    return tensors


def log_test_metrics(
    result: MemberResult, config: RunConfig, test: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """The trained network's loss and accuracy on the (normalized) ``test`` images, logged
    to its run as test_loss and test_acc: for stages that test what they train."""
    images, labels = test
    logits = evaluate_logits(
        result.model, images, config.train.eval_batch_size, config.train.precision
    )
    test_loss, test_acc = loss_and_accuracy(torch.log_softmax(logits, dim=1), labels)
    tracking.log_metrics(result.run_id, {"test_acc": test_acc, "test_loss": test_loss})
    return test_loss, test_acc


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
    mlflow_name: str | None = None,
    on_epoch: Callable[[LoopState], None] | None = None,
    parallel: ProcessGroup | None = None,
    setup: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
) -> MemberResult:
    """Train one member with checkpoints and MLflow; raise DivergedError on NaN loss.

    A checkpoint of the same config, seed and data is continued (or, when finished,
    reused); its MLflow run is continued too, and epochs the tracking store lost to a
    kill are logged again. ``on_epoch`` runs after the checkpoint and the logging (tune's
    pruning hook raises from it). With ``parallel`` this is rank 0 of a torchrun job; the
    other processes run ``follow_member`` alongside. ``setup`` takes the freshly built network
    (e.g. loads pretrained weights, freezes layers) and returns the optimizer's param groups.
    Another process training into ``checkpoint_dir`` at the same time is refused at once
    (LockedError, exit 1): never two writers of one checkpoint. ``run_name`` names the
    training in messages; ``mlflow_name`` (default ``run_name``) is the MLflow run's name.
    """
    world_size = parallel.world_size if parallel is not None else 1
    # One process at a time trains into a checkpoint folder (another refuses at once).
    with files.exclusive(
        paths.checkpoint_lock(checkpoint_dir),
        holder=f"training {run_name} seed {member.seed}",
        busy=f"cannot train {run_name} into {checkpoint_dir}",
    ):
        path = checkpoint_file(checkpoint_dir, config, member.seed, data_meta["digest"], world_size)
        # A damaged checkpoint is set aside (a warning): the member trains from the start.
        saved = resume_checkpoint(path, lambda: _new_model(config, tensors, data_meta).state_dict())
        previous_run = saved.get("run_id") if saved else None
        if previous_run is not None and not tracking.run_exists(previous_run):
            previous_run = None  # not in this store (deleted, another store): a new run
        if saved is not None and saved.get("finished"):
            if previous_run is not None:
                _share_start(parallel, saved)
                # Trained before with this config, seed and data: the same network again, and
                # its MLflow run stays as it ended (nested under this parent from now on:
                # another matrix.seeds makes another parent of the same runs).
                if parent_run_id is not None:
                    tracking.set_tags(previous_run, {"mlflow.parentRunId": parent_run_id})
                model = _new_model(config, tensors, data_meta).to(_device_of(tensors))
                model.load_state_dict(_kept_weights(saved["loop"], config))
                result = _finished_result(saved["loop"], config)
                return MemberResult(member=member, run_id=previous_run, fit=result, model=model)
            saved = None  # its run is gone: train anew and record a complete run
        _share_start(parallel, saved)
        run_id = tracking.start_run(
            experiment_id,
            mlflow_name or run_name,
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
        # System metrics (opt-in) stop before the run ends: the inner block.
        with (
            tracking.ending_run(run_id),
            tracking.system_metrics(run_id, config.mlflow.system_metrics),
        ):
            tracking.log_params(run_id, {**config.model_dump(mode="json"), "seed": member.seed})
            images, labels = tensors["train"]
            tracking.log_dataset(
                run_id,
                f"{config.data.name}-train",
                images.cpu().numpy(),
                labels.cpu().numpy(),
                source=str(paths.prepared_split_path("train")),
                digest=data_meta["digest"][:36],
            )
            start = LoopState.from_dict(saved["loop"]) if saved else None
            if start is not None:
                _relog_missing_epochs(run_id, start.history)

            label = f"{run_name} seed {member.seed}"
            bar = epoch_bar(label, config.train.epochs)  # None unless stderr is a terminal
            progress = epoch_line(label, config.train.epochs, bar)
            try:
                model, result = fit_member(
                    config,
                    tensors,
                    data_meta,
                    member.seed,
                    start,
                    after_epoch,
                    parallel,
                    setup,
                    on_batch=bar,
                )
            finally:
                if bar is not None:
                    bar.close()
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


def fit_member(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_meta: dict[str, Any],
    seed: int,
    start: LoopState | None,
    on_epoch_end: Callable[[LoopState], None] | None,
    parallel: ProcessGroup | None,
    setup: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
    on_batch: BatchCallback | None = None,
) -> tuple[nn.Module, FitResult]:
    """Build the member's network, optimizer and schedule and train it (every process of
    a torchrun job runs this with the same arguments, rank 0 with its callback). It trains
    on the device the tensors are on; the network is built on the CPU (the same initial
    weights everywhere) and moved there before the optimizer is built."""
    device = _device_of(tensors)
    model = initial_model(config, tensors, data_meta, seed).to(device)
    set_training_layout(model, config.train.precision, device)
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
        device=device,
        on_batch=on_batch,
    )
    set_portable_layout(model)  # saved, logged and exported weights are NCHW
    return model, result


def initial_model(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_meta: dict[str, Any],
    seed: int,
) -> nn.Module:
    """The member's network before training, on the CPU: its weights depend on the
    architecture and ``seed`` only, so replica r of two experiments with the same network
    starts from the same weights (the pairing of the report's tests)."""
    torch.manual_seed(seed)
    return _new_model(config, tensors, data_meta)


def _share_start(parallel: ProcessGroup | None, saved: dict[str, Any] | None) -> None:
    """Under torchrun, the other processes start (or skip) the member where rank 0 does."""
    if parallel is not None:
        parallel.broadcast(saved)


def follow_member(
    config: RunConfig,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    data_meta: dict[str, Any],
    member: Member,
    parallel: ProcessGroup,
) -> None:
    """A process of rank > 0: trains its shards in step with rank 0, which decides where
    to start (its checkpoint) and alone writes checkpoints, outputs and MLflow records."""
    saved: dict[str, Any] | None = parallel.broadcast(None)
    if saved is not None and saved.get("finished"):
        return
    start = LoopState.from_dict(saved["loop"]) if saved else None
    _, result = fit_member(config, tensors, data_meta, member.seed, start, None, parallel)
    if result.stop_reason == "diverged":
        raise DivergedError(f"rank {parallel.rank}: seed {member.seed} diverged with rank 0")


def _device_of(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.device:
    return tensors["train"][0].device


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
    from deepopt.figures import plot_history  # lazy: matplotlib

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
    tracking.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    if config.mlflow.log_model:
        # The logged model holds CPU tensors (a copy: the trained one stays on its device).
        on_cpu = model if example.device.type == "cpu" else copy.deepcopy(model).cpu()
        tracking.log_model(run_id, on_cpu.float().eval(), example.float().cpu().numpy())
    tracking.end_run(run_id, "FINISHED")
