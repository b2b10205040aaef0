"""Data-parallel training under torchrun on the CPU (gloo): 2 processes with batch 25 train
as 1 process with batch 50, resume after the job is stopped, and only rank 0 writes and
records in MLflow."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from torch import nn

from deepopt import cli
from deepopt.errors import ConfigError
from deepopt.training import steps_per_epoch
from deepopt.training.distributed import (
    GlobalBatchNorm,
    ProcessGroup,
    backend_for,
    check_parallel_device,
    join_from_env,
    local_device,
    synchronize_batchnorm,
)

JOB_TIMEOUT_S = 300


def _torchrun(work: Path, processes: int = 2) -> subprocess.Popen[str]:
    """`torchrun --standalone --nproc_per_node=N -m deepopt train --experiment small`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free rendezvous port on this machine
            f"--nproc_per_node={processes}",
            "-m",
            "deepopt",
            "train",
            "--experiment",
            "small",
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finish(process: subprocess.Popen[str]) -> str:
    try:
        out, err = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, f"torchrun exited {process.returncode}:\n{err[-3000:]}"
    return out + err


def _history(work: Path) -> list[dict[str, float]]:
    lines = (work / "plots" / "small" / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [
        {k: float(v) for k, v in zip(header, line.split(","), strict=True) if k != "seconds"}
        for line in lines[1:]
    ]


def _weights(work: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(work / "models" / "small" / "model.pt", weights_only=True)
    (member,) = saved["members"]
    state: dict[str, torch.Tensor] = member["state_dict"]
    return state


def _client() -> MlflowClient:
    # This test's store (the environment's), not the one an earlier test's in-process
    # command left set in mlflow's module state.
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _runs() -> list[Any]:
    """The seed runs of torchrun jobs (tagged with their world size; not their parents)."""
    client = _client()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`deepopt.role` = 'seed'")
    return [run for run in runs if "world_size" in run.data.tags]


def test_shards_split_a_global_batch_and_weigh_losses_to_its_mean() -> None:
    index = torch.arange(7)
    parts = [ProcessGroup(rank=r, world_size=3, local_rank=r).shard(index) for r in range(3)]
    assert [p[0].tolist() for p in parts if p] == [[0, 1, 2], [3, 4], [5, 6]]
    # DDP averages the 3 gradients of weight_r * (mean loss of n_r samples): every sample's
    # loss then counts weight_r / (3 * n_r) = 1/7, as in the mean over the global batch.
    for part, weight in (p for p in parts if p):
        assert weight / (3 * len(part)) == pytest.approx(1 / 7)
    assert ProcessGroup(rank=0, world_size=3, local_rank=0).shard(torch.arange(2)) is None
    assert steps_per_epoch(450, 25, 2) == 9 and steps_per_epoch(451, 25, 2) == 9
    assert steps_per_epoch(452, 25, 2) == 10 and steps_per_epoch(451, 50) == 10


def test_backend_is_gloo_on_the_cpu_and_nccl_for_cuda_devices() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"  # as before the device setting
    assert backend_for(torch.device("mps")) == "gloo"
    # Selection only: no GPU is needed to pick the backend for a CUDA device.
    nccl = "nccl" if dist.is_nccl_available() else "gloo"
    assert backend_for(torch.device("cuda")) == backend_for(torch.device("cuda", 3)) == nccl


def test_each_process_takes_the_gpu_of_its_local_rank() -> None:
    for device in (torch.device("cuda"), torch.device("cuda", 0)):
        assert [local_device(device, rank) for rank in range(4)] == [
            torch.device("cuda", rank) for rank in range(4)
        ]
    assert local_device(torch.device("cpu"), 3) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda:1", "mps"])
def test_a_device_the_processes_cannot_share_is_a_one_line_config_error(device: str) -> None:
    expected = re.escape(f"train.device '{device}' with torchrun")
    with pytest.raises(ConfigError, match=expected) as caught:
        check_parallel_device(device, world_size=2)
    assert "\n" not in str(caught.value)
    check_parallel_device(device, world_size=1)  # one process: the device is its own


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_devices_without_an_index_are_shared_by_rank(device: str) -> None:
    check_parallel_device(device, world_size=4)


def test_join_refuses_a_named_gpu_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK; set train\.device to cuda or auto"):
        join_from_env(device="cuda:0")
    assert not dist.is_initialized()


def test_one_process_joins_no_group_whatever_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_from_env(device="cuda:1") is None  # the device is resolved by the stage
    assert ProcessGroup(rank=0, world_size=2, local_rank=0).device == torch.device("cpu")


@pytest.mark.slow
def test_two_processes_with_batch_25_match_one_with_batch_50_across_a_stop_and_resume(
    workspace: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_bn = {"batchnorm": False}
    quiet = {"log_model": False}
    work = workspace(
        model=no_bn, mlflow=quiet, train={"batch_size": 50, "checkpoint_dir": str(tmp_path / "a")}
    )
    assert cli.main(["train", "--experiment", "small"]) == 0
    single, single_weights = _history(work), _weights(work)

    workspace(
        model=no_bn, mlflow=quiet, train={"batch_size": 25, "checkpoint_dir": str(tmp_path / "b")}
    )
    job = _torchrun(work)
    assert job.stderr is not None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for line in job.stderr:  # rank 0's progress: epoch 1 is checkpointed and logged
        if "epoch 1/3" in line:
            break
        assert time.monotonic() < deadline, "the job made no progress"
    job.send_signal(signal.SIGTERM)  # as a scheduler preempting the job; torchrun forwards it
    job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode != 0
    (stopped,) = _runs()
    assert stopped.info.status == "KILLED"

    log = _finish(_torchrun(work))
    assert "epoch 1/3" not in log and "epoch 3/3" in log  # continued after epoch 1
    parallel = _history(work)
    assert [r["epoch"] for r in parallel] == [0.0, 1.0, 2.0]
    for one, two in zip(single, parallel, strict=True):
        for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["epoch"], key)
    weights = _weights(work)
    for name, value in single_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)

    (run,) = _runs()  # the stopped run, continued by rank 0 only
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    steps = [m.step for m in _client().get_metric_history(run.info.run_id, "val_loss")]
    assert sorted(steps) == [0, 1, 2]
    assert len(list((tmp_path / "b" / "small").glob("*.pt"))) == 1  # one checkpoint


def _batchnorm_on_shards(rank: int, world_size: int, store: str) -> None:
    """One of ``world_size`` processes: BatchNorms synchronized over the processes, on
    this process's shard of a batch, against plain BatchNorms on the whole batch."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    images, labels = torch.randn(11, 3, 5, 5) * 3 + 1, torch.randint(0, 4, (11,))
    whole = nn.Sequential(
        nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 4), nn.BatchNorm1d(4)
    )
    sharded = synchronize_batchnorm(copy.deepcopy(whole))
    assert isinstance(sharded[1], GlobalBatchNorm) and isinstance(sharded[4], GlobalBatchNorm)
    expected = whole(images)
    nn.functional.cross_entropy(expected, labels).backward()

    group = ProcessGroup(rank=rank, world_size=world_size, local_rank=rank)
    part = group.shard(torch.arange(11))
    assert part is not None
    index, weight = part  # shards of 6 and 5: unequal, so the weights matter
    output = sharded(images[index])
    (nn.functional.cross_entropy(output, labels[index]) * weight).backward()
    for parameter in sharded.parameters():  # what DDP does with the gradients
        assert parameter.grad is not None
        group.all_reduce_sum(parameter.grad)
        parameter.grad /= world_size

    torch.testing.assert_close(output, expected[index], rtol=1e-5, atol=1e-5)
    for (name, mine), theirs in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, mine), theirs in zip(sharded.named_buffers(), whole.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_on_two_shards_normalizes_and_learns_as_batchnorm_on_the_whole(
    tmp_path: Path,
) -> None:
    # Two real gloo processes; an assertion failing in either fails this test.
    torch.multiprocessing.spawn(
        _batchnorm_on_shards, args=(2, str(tmp_path / "store")), nprocs=2, join=True
    )


@pytest.mark.slow
def test_synchronized_batchnorm_job_completes_and_records_once(
    workspace: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace(train={"epochs": 2, "batch_size": 25, "sync_batchnorm": True})
    log = _finish(_torchrun(work))
    assert log.count("epoch 2/2") == 1  # one process reports

    summary = json.loads((work / "metrics" / "small" / "train.json").read_text())
    assert summary["epochs_run"] == 2
    (run,) = _runs()
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    client = _client()
    for key in ("loss", "val_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, key)
        logged = [(m.step, m.value, m.timestamp, m.model_id) for m in history]
        # Once per epoch (log_model adds copies linked to the model: not epochs).
        assert sorted(m.step for m in history if m.model_id is None) == [0, 1], (key, logged)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]  # logged once, by rank 0
    # The saved network is a plain one: evaluate loads it in one process.
    assert cli.main(["evaluate", "--experiment", "small"]) == 0
