"""What train wrote, read back for evaluate: model.pt's networks rebuilt in eval mode and
run.json's MLflow run ids, each checked against the other and against the test data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from deepopt import paths
from deepopt.config import ModelConfig, saved_model_config
from deepopt.errors import DataError, one_line
from deepopt.files import UnreadableFileError, load_torch
from deepopt.models import build_model

__all__ = [
    "Trained",
    "TrainedMember",
    "check_shapes",
    "load_run_ids",
    "load_trained",
    "parent_run_id",
    "retrain_hint",
]


@dataclass(frozen=True)
class TrainedMember:
    """One trained network of model.pt: deepopt.training's Member (its replica, its index in
    the replica's ensemble, its seed) with the network rebuilt, in eval mode."""

    replica: int
    index: int
    seed: int
    model: nn.Module


@dataclass(frozen=True)
class Trained:
    """The content of model.pt with each member's network rebuilt."""

    experiment: str
    model_config: ModelConfig
    image_shape: tuple[int, int, int]
    num_classes: int
    members: list[TrainedMember]

    def replicas(self) -> dict[int, list[TrainedMember]]:
        """Members grouped by replica, each group in ensemble order."""
        groups: dict[int, list[TrainedMember]] = {}
        for member in sorted(self.members, key=lambda m: (m.replica, m.index)):
            groups.setdefault(member.replica, []).append(member)
        return groups


def retrain_hint(experiment: str) -> str:
    """What makes an experiment's model.pt and run.json (again)."""
    option = "" if experiment == paths.BASE_EXPERIMENT else f" --experiment {experiment}"
    return f"run `deepopt train{option}` (or `dvc repro`)"


def load_trained(path: Path, experiment: str) -> Trained:
    """model.pt with its networks rebuilt in eval mode (DataError if missing or malformed)."""
    hint = retrain_hint(experiment)
    try:
        content = load_torch(path)
    except FileNotFoundError:
        raise DataError(f"{path}: trained model is missing; {hint}") from None
    except UnreadableFileError as err:
        raise DataError(f"{path}: cannot be loaded ({err.problem}); {hint}") from None
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise DataError(f"{path}: not a model file of train (it holds a {kind}); {hint}")
    try:
        model_config = saved_model_config(content["model_config"])
        channels, height, width = (int(n) for n in content["image_shape"])
        image_shape = (channels, height, width)
        num_classes = int(content["num_classes"])
        members = []
        for entry in content["members"]:
            # load_weights=False: the state dict follows; model.weights (a file, a download)
            # was only where the training started.
            model = build_model(
                model_config, image_shape=image_shape, num_classes=num_classes, load_weights=False
            )
            model.load_state_dict(entry["state_dict"])
            members.append(
                TrainedMember(
                    replica=int(entry["replica"]),
                    index=int(entry["index"]),
                    seed=int(entry["seed"]),
                    model=model.eval(),
                )
            )
    except (KeyError, TypeError, ValueError, RuntimeError, ValidationError) as err:
        problem = one_line(err, 200)
        raise DataError(f"{path}: not a model file of train ({problem}); {hint}") from None
    if not members:
        raise DataError(f"{path}: holds no trained members; {hint}")
    trained = Trained(experiment, model_config, image_shape, num_classes, members)
    sizes = {len(group) for group in trained.replicas().values()}
    if len(sizes) != 1:
        raise DataError(f"{path}: replicas have different ensemble sizes {sorted(sizes)}; {hint}")
    return trained


def load_run_ids(path: Path, trained: Trained) -> tuple[str, dict[tuple[int, int], str]]:
    """run.json's MLflow experiment id and the run id of each (replica, index) member."""
    hint = retrain_hint(trained.experiment)
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: not a run record of train (the file is empty); {hint}")
        info = json.loads(text)
        if not isinstance(info, dict) or not isinstance(info.get("runs"), list):
            shape = "no 'runs' list" if isinstance(info, dict) else f"a {type(info).__name__}"
            raise DataError(f"{path}: not a run record of train (it holds {shape}); {hint}")
        experiment_id = str(info["mlflow_experiment_id"])
        runs = {(int(r["replica"]), int(r["index"])): str(r["run_id"]) for r in info["runs"]}
    except FileNotFoundError:
        raise DataError(f"{path}: run record of the training is missing; {hint}") from None
    except KeyError as err:
        raise DataError(f"{path}: not a run record of train (no {err}); {hint}") from None
    except (OSError, ValueError, TypeError) as err:
        problem = one_line(err, 200, with_type=isinstance(err, TypeError))
        raise DataError(f"{path}: not a run record of train ({problem}); {hint}") from None
    for member in trained.members:
        if (member.replica, member.index) not in runs:
            raise DataError(
                f"{path}: no run for replica {member.replica} member {member.index} "
                f"(seed {member.seed}) of the model file; {hint}"
            )
    return experiment_id, runs


def parent_run_id(path: Path) -> str | None:
    """The experiment's parent run in run.json (None in a run.json from before parents);
    call after ``load_run_ids`` has checked the file."""
    info = json.loads(path.read_text(encoding="utf-8"))
    parent = info.get("parent_run_id")
    return str(parent) if parent is not None else None


def check_shapes(trained: Trained, num_classes: int, test_shape: tuple[int, ...]) -> None:
    """DataError unless the network fits the prepared test data (classes, image shape)."""
    if trained.num_classes != num_classes or trained.image_shape != test_shape:
        raise DataError(
            f"{paths.model_path(trained.experiment)}: trained for {trained.num_classes} classes "
            f"of {_size(trained.image_shape)} images, but the prepared test data has "
            f"{num_classes} classes of {_size(test_shape)} images; "
            f"{retrain_hint(trained.experiment)}"
        )


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)
