"""Worker processes: a session starts ``tune.workers`` of ``deepopt tune --worker`` on its
study, forwards a Ctrl-C to them once, and each stops when its session is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from deepopt.config import Params
from deepopt.errors import EXIT_INTERRUPTED, DeepoptError

__all__ = ["orphan_check", "run_workers", "stop_workers"]


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
    params: Params, *, study: str, storage: str, n_trials: int, parent_run: str, folder: Path
) -> None:
    """``tune.workers`` processes of ``deepopt tune --worker`` on the same study and params.

    They start in their own session, so a Ctrl-C reaches them once, forwarded from here.
    """
    count = params.tune.workers
    threads = max(1, (params.train.threads or os.cpu_count() or 1) // count)
    folder.mkdir(parents=True, exist_ok=True)
    # The params as this session validated them, even if params.yaml changes meanwhile.
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="session-params-", dir=folder, delete=False
    ) as handle:
        yaml.safe_dump(params.model_dump(mode="json"), handle)
    params_file = Path(handle.name)
    command = [sys.executable, "-m", "deepopt.cli", "--params", str(params_file), "tune"]
    options = ["--worker", "--storage", storage, "--n-trials", str(n_trials)]
    options += ["--study-name", study, "--parent-run", parent_run, "--threads", str(threads)]
    options += ["--session-pid", str(os.getpid())]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            workers.append(
                subprocess.Popen(
                    [*command, *options, "--worker-index", str(index)],
                    stdout=subprocess.DEVNULL,  # each prints a JSON summary; ours is the one
                    start_new_session=True,
                )
            )
        codes = [process.wait() for process in workers]
    except KeyboardInterrupt:
        stop_workers(workers)
        raise
    finally:
        params_file.unlink(missing_ok=True)
    if EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    failed = [f"worker {i} exited {code}" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise DeepoptError(f"tune: {', '.join(failed)}; its error is printed above")
