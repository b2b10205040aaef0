"""Which device each tune worker trains on: spread over the GPUs, shared on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from deepopt.config import load_params, parse_params, resolve_experiment
from deepopt.tuning.workers import _params_file, _with_device, worker_devices

CUDA = torch.device("cuda", 0)


def test_worker_i_trains_on_gpu_i_mod_n() -> None:
    assert worker_devices("auto", CUDA, 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda", CUDA, 3, 4) == ["cuda:0", "cuda:1", "cuda:2"]  # a GPU spare


def test_several_workers_share_one_gpu() -> None:
    assert worker_devices("cuda", CUDA, 3, 1) == ["cuda:0"] * 3


def test_a_named_gpu_takes_every_worker() -> None:
    assert worker_devices("cuda:1", torch.device("cuda", 1), 3, 2) == ["cuda:1"] * 3


@pytest.mark.parametrize("spec", ["auto", "cpu"])
def test_on_the_cpu_every_worker_keeps_the_setting(spec: str) -> None:
    assert worker_devices(spec, torch.device("cpu"), 4, 0) == [spec] * 4


def test_cuda_without_visible_gpus_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="gpus=0"):
        worker_devices("cuda", CUDA, 2, 0)


@pytest.mark.parametrize("experiment_device", [None, "cpu"])
def test_worker_params_file_trains_the_tuned_experiment_on_the_worker_device(
    base_params: dict[str, Any], tmp_path: Path, experiment_device: str | None
) -> None:
    """Set in the base config, and in the tuned experiment's override where it has one;
    the file a worker reads validates as the session's params did."""
    raw = copy.deepcopy(base_params)
    overrides: dict[str, Any] = {"train": {"epochs": 2}}
    if experiment_device is not None:
        overrides["train"]["device"] = experiment_device
    raw["experiments"] = {"small": overrides}
    raw["tune"]["experiment"] = "small"
    dumped = parse_params(raw).model_dump(mode="json")

    changed = load_params(_params_file(tmp_path, _with_device(dumped, "small", "cuda:1")))
    assert resolve_experiment(changed, "small").train.device == "cuda:1"
    assert resolve_experiment(changed, "small").train.epochs == 2
    assert changed.train.device == "cuda:1"
    assert dumped["train"]["device"] == "auto"  # the session's own params stay as they were
