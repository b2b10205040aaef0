"""Worker processes: a session starts ``tune.workers`` of ``deepopt tune --worker`` on its
study, forwards a Ctrl-C to them once, and each stops when its session is gone.

On the CPU the workers share the cores (torch threads split among them). When the tuned
experiment's ``train.device`` resolves to CUDA, the workers spread over the visible GPUs,
worker i on GPU i mod n (``worker_devices``); more workers than GPUs share them.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from deepopt.config import Params, resolve_experiment
from deepopt.devices import resolve_device
from deepopt.errors import EXIT_INTERRUPTED, DeepoptError

__all__ = ["orphan_check", "run_workers", "stop_workers", "worker_devices"]


def worker_devices(spec: str, device: torch.device, count: int, gpus: int) -> list[str]:
    """The ``train.device`` of each of ``count`` workers, for the tuned experiment's
    ``spec`` (its train.device) resolved to ``device`` with ``gpus`` CUDA devices visible.

    CUDA from ``auto`` or ``cuda``: worker i on GPU i mod ``gpus`` (several workers per GPU
    when there are more workers than GPUs). An explicit ``cuda:N`` keeps them all on GPU N,
    and any other device is every worker's as it is.
    """
    if device.type != "cuda" or ":" in spec:
        return [spec] * count
    if gpus < 1:
        raise ValueError(f"{device} resolved but {gpus=}: CUDA devices must be visible")
    return [f"cuda:{index % gpus}" for index in range(count)]


def _with_device(params: dict[str, Any], experiment: str | None, device: str) -> dict[str, Any]:
    """``params`` (Params as JSON) whose tuned experiment trains on ``device``: the base
    train.device and the experiment's own train.device override, where it has one."""
    changed = copy.deepcopy(params)
    changed["train"]["device"] = device
    if experiment is not None:
        overrides = changed["experiments"][experiment].get("train")
        if isinstance(overrides, dict) and "device" in overrides:
            overrides["device"] = device
    return changed


def orphan_check(session_pid: int | None) -> Callable[[], bool]:
    """Whether this worker's session is gone: the session passes its pid, and a worker
    reparented after its session was killed must not keep training unseen (checked per
    epoch and before each trial). Always False without a session pid."""

    def orphaned() -> bool:
        return session_pid is not None and os.getppid() != session_pid

    return orphaned


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """Interrupt the workers once (each fails and requeues its trial), then wait."""
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in workers:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_workers(
    params: Params,
    *,
    study: str,
    storage: str,
    n_trials: int,
    parent_run: str,
    folder: Path,
    label: str | None = None,
) -> None:
    """``tune.workers`` processes of ``deepopt tune --worker`` on the same study and params.

    They start in their own session, so a Ctrl-C reaches them once, forwarded from here.
    """
    count = params.tune.workers
    threads = max(1, (params.train.threads or os.cpu_count() or 1) // count)
    spec = resolve_experiment(params, params.tune.experiment).train.device
    device = resolve_device(spec)
    # device_count leaves torch.cuda uninitialized (the workers use the GPUs, not this process)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    folder.mkdir(parents=True, exist_ok=True)
    # The params as this session validated them, even if params.yaml changes meanwhile,
    # with each worker's device: one file per worker.
    validated = params.model_dump(mode="json")
    params_files: list[Path] = []
    options = ["--worker", "--storage", storage, "--n-trials", str(n_trials)]
    options += ["--study-name", study, "--parent-run", parent_run, "--threads", str(threads)]
    options += ["--session-pid", str(os.getpid())]
    if label is not None:  # the workers' runs are tagged as the session's
        options += ["--label", label]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index, worker_device in enumerate(worker_devices(spec, device, count, gpus)):
            own = _with_device(validated, params.tune.experiment, worker_device)
            params_files.append(_params_file(folder, own))
            command = [sys.executable, "-m", "deepopt.cli", "--params", str(params_files[-1])]
            workers.append(
                subprocess.Popen(
                    [*command, "tune", *options, "--worker-index", str(index)],
                    stdout=subprocess.DEVNULL,  # each prints a JSON summary; ours is the one
                    start_new_session=True,
                )
            )
        codes = [process.wait() for process in workers]
    except KeyboardInterrupt:
        stop_workers(workers)
        raise
    finally:
        for params_file in params_files:
            params_file.unlink(missing_ok=True)
    if EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    failed = [f"worker {i} exited {code}" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise DeepoptError(f"tune: {', '.join(failed)}; its error is printed above")


def _params_file(folder: Path, params: dict[str, Any]) -> Path:
    """A new session-params-*.yaml in ``folder`` holding ``params``."""
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="session-params-", dir=folder, delete=False
    ) as handle:
        yaml.safe_dump(params, handle)
    return Path(handle.name)
