"""train.device on a machine without a GPU: resolution, refusals, the CPU left as it is,
portable checkpoints (a CUDA-tagged file loads on the CPU), resume on device cpu."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from deepopt import devices, files
from deepopt.errors import EXIT_CONFIG, ConfigError
from deepopt.training import LoopState, load_checkpoint, save_checkpoint
from system.test_bad_input import run_cli
from training.test_loop import _run

no_accelerator = pytest.mark.skipif(
    devices.available_devices() != ["cpu"], reason="this machine has an accelerator"
)


@no_accelerator
def test_auto_and_cpu_resolve_to_the_cpu_here() -> None:
    assert devices.available_devices() == ["cpu"]
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")


@no_accelerator
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "mps"])
def test_a_device_that_is_not_there_is_a_one_line_config_error(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        devices.resolve_device(spec)
    message = str(caught.value)
    assert message == f"train.device '{spec}' is not available here; available: cpu"
    assert caught.value.exit_code == EXIT_CONFIG and "\n" not in message


@no_accelerator
def test_deepopt_train_on_a_missing_gpu_exits_2_with_one_line_and_trains_nothing(
    workspace: Callable[..., Path],
) -> None:
    work = workspace(train={"device": "cuda"})
    code, _, stderr = run_cli(("train",), work, as_subprocess=True)
    assert code == EXIT_CONFIG
    assert stderr.strip() == (
        "deepopt: error: train.device 'cuda' is not available here; available: cpu"
    )
    assert not (work / "models").exists() and not (work / "checkpoints").exists()


def test_fp16_off_cuda_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^train.precision fp16 needs a CUDA device; on cpu"):
        devices.check_precision(torch.device("cpu"), "fp16")
    for precision in ("fp32", "bf16"):
        devices.check_precision(torch.device("cpu"), precision)  # allowed


def _backend_switches() -> dict[str, Any]:
    return {
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
    }


@pytest.mark.parametrize("deterministic", [True, False])
def test_configure_backends_changes_nothing_on_the_cpu(deterministic: bool) -> None:
    before = _backend_switches()
    devices.configure_backends(
        torch.device("cpu"), deterministic=deterministic, tf32=not deterministic
    )
    assert _backend_switches() == before


def test_cpu_device_tags_name_the_cpu() -> None:
    tags = devices.device_tags(torch.device("cpu"))
    assert set(tags) == {"device", "device_name"} and tags["device"] == "cpu"
    assert tags["device_name"]


def test_to_cpu_keeps_the_nested_structure() -> None:
    weight = torch.ones(2)
    nested = {"a": [weight, (torch.zeros(1), 3)], "b": {"c": "text", "d": None}}
    moved = devices.to_cpu(nested)
    assert moved == {"a": [weight, (torch.zeros(1), 3)], "b": {"c": "text", "d": None}}
    assert isinstance(moved["a"][1], tuple) and moved["a"][0] is weight  # CPU: not copied
    assert all(t.device.type == "cpu" for t in (moved["a"][0], moved["a"][1][0]))


def _save_tagged_cuda(path: Path, payload: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save as on a GPU: every storage's location tag is "cuda:0" (torch.save asks
    torch.serialization.location_tag for each storage it writes)."""
    with monkeypatch.context() as patched:
        patched.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, path)


def _checkpoint() -> dict[str, Any]:
    _, states = _run(epochs=1)
    return {"loop": states[-1].to_dict(), "run_id": None, "finished": False}


@no_accelerator
def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = _checkpoint()
    path = tmp_path / "gpu.pt"
    _save_tagged_cuda(path, payload, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # what deepopt's map_location avoids
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert loaded is not None
    weights = loaded["loop"]["model"]
    assert all(t.device.type == "cpu" for t in weights.values())
    assert all(torch.equal(weights[k], v) for k, v in payload["loop"]["model"].items())
    model = files.load_torch(path)["loop"]["model"]
    assert all(t.device.type == "cpu" for t in model.values())


def test_a_resumed_run_on_device_cpu_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    full, _ = _run(epochs=4, device=torch.device("cpu"))
    _, states = _run(epochs=2, device=torch.device("cpu"))
    path = tmp_path / "member.pt"
    save_checkpoint(path, {"loop": states[-1].to_dict(), "run_id": None, "finished": False})
    saved = load_checkpoint(path)
    assert saved is not None
    resumed, _ = _run(
        epochs=4, start=LoopState.from_dict(saved["loop"]), device=torch.device("cpu")
    )
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_fp16_resumes_with_its_gradient_scaler(tmp_path: Path) -> None:
    # fp16 is refused off CUDA at the stage's start; the loop itself runs it with the
    # device's GradScaler, so its scaler state is saved and resumed here on the CPU too.
    full, _ = _run(epochs=3, precision="fp16")
    _, states = _run(epochs=1, precision="fp16")
    assert states[-1].grad_scaler is not None and states[-1].grad_scaler["scale"] > 0
    start = LoopState.from_dict(copy.deepcopy(states[-1].to_dict()))
    resumed, _ = _run(epochs=3, start=start, precision="fp16")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
