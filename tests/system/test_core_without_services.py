"""The training core imports and trains where mlflow, dvc and optuna are not installed.

A GPU machine may have only torch (benchmarks/gpu_check.sh runs there): deepopt.devices,
the loop, the models, the optimizers and the data readers must not need the services. The
child process gets a meta path finder that refuses those top-level names, as if absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("mlflow", "dvc", "optuna")

_PREAMBLE = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class _Absent:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _Absent)
    for _name in list(sys.modules):
        assert _name.partition(".")[0] not in BLOCKED, _name
    """
)

_TRAIN = textwrap.dedent(
    """
    import tempfile
    from pathlib import Path

    import torch

    import deepopt.data
    import deepopt.devices as devices
    import deepopt.models
    import deepopt.optim
    import deepopt.training.loop as loop
    from deepopt.config import EarlyStopConfig, ModelConfig, OptimConfig, ScheduleConfig

    sys.path.insert(0, {tests!r})
    from tiny_data import write_tiny_idx_dataset

    device = devices.resolve_device("cpu")
    devices.configure_backends(device, deterministic=True, tf32=False)
    folder = Path(tempfile.mkdtemp()) / "raw"
    write_tiny_idx_dataset(folder, n_train=60, n_test=20)
    files = deepopt.data.RAW_FILES
    pixels = deepopt.data.read_idx(folder / f"{{files['train_images']}}.gz")
    images = pixels.unsqueeze(1).float() / 255.0
    labels = deepopt.data.read_idx(folder / f"{{files['train_labels']}}.gz").long()
    torch.manual_seed(0)
    model = deepopt.models.build_model(
        ModelConfig(name="lecture_cnn", conv_channels=(4, 8, 8), dense_units=16)
    )
    optimizer = deepopt.optim.build_optimizer(model.parameters(), OptimConfig(name="nesterov"))
    schedule = deepopt.optim.build_schedule(
        optimizer, ScheduleConfig(name="inverse_time", decay=1e-2), epochs=1, steps_per_epoch=3
    )
    result = loop.fit(
        model,
        optimizer,
        schedule,
        (images[:40], labels[:40]),
        (images[40:], labels[40:]),
        epochs=1,
        batch_size=20,
        early_stop=EarlyStopConfig(enabled=False),
        seed=0,
        device=device,
    )
    assert result.epochs_run == 1, result
    assert all(v == v for v in result.history[0].values()), result.history
    loaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("trained", result.history[0]["loss"])
    """
)


@pytest.mark.slow
def test_training_core_runs_without_mlflow_dvc_optuna() -> None:
    code = _PREAMBLE.format(blocked=set(SERVICES)) + _TRAIN.format(tests=str(REPO / "tests"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained" in done.stdout
