"""MLflow's system metrics for a run by id (``mlflow.system_metrics: true``): what the machine
did while a run trained, as ``system/*`` metrics beside its epochs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from deepopt.errors import ConfigError, one_line
from deepopt.tracking.store import configured_uri

__all__ = ["SAMPLING_INTERVAL_S", "system_metrics"]

# MLflow's default; its MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds) overrides it.
SAMPLING_INTERVAL_S = 10.0


@contextlib.contextmanager
def system_metrics(
    run_id: str, enabled: bool, *, sampling_interval: float = SAMPLING_INTERVAL_S
) -> Iterator[None]:
    """While the block runs, MLflow's SystemMetricsMonitor samples this machine into run
    ``run_id`` (nothing happens unless ``enabled``).

    Each ``sampling_interval`` seconds a thread logs ``system/*`` metrics at steps 0, 1, ...
    (a resumed run continues its steps): CPU utilization, memory, disk and network, and,
    when nvidia-ml-py (``pynvml``) is installed, each NVIDIA GPU's utilization, memory and
    power. deepopt does not depend on nvidia-ml-py: ``pip install nvidia-ml-py`` on a GPU
    machine to get the GPU metrics. Under torchrun only rank 0 records, and NVML shows it
    every GPU of its machine. MLflow needs psutil for any of this.

    Nest the block inside the run's (``tracked_run``/``ending_run``): it must end first. A
    sample is logged once its interval is complete, so a run shorter than one interval
    logs none; MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL environment variable, when
    set, overrides ``sampling_interval``.
    """
    if not enabled:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as err:  # psutil, which MLflow leaves out of its dependencies
        raise ConfigError(
            f"mlflow.system_metrics: true needs psutil ({one_line(err)}); "
            "pip install psutil, or set mlflow.system_metrics: false"
        ) from None
    monitor = SystemMetricsMonitor(  # type: ignore[no-untyped-call]
        run_id,
        sampling_interval=sampling_interval,
        resume_logging=True,  # a new run has no system/* steps yet: it starts at 0
        tracking_uri=configured_uri(),
    )
    monitor.start()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        # Joins the sampling thread and logs the samples it still holds.
        monitor.finish()  # type: ignore[no-untyped-call]
