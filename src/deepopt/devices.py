"""Where training runs: ``train.device`` resolved, checked and set up, and tensors moved back.

``resolve_device`` turns ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` into a ``torch.device``
that is there (a ConfigError naming what is available otherwise); ``check_precision``
refuses fp16 off CUDA; ``configure_backends`` sets CUDA's deterministic or TF32 switches
before CUDA initializes and leaves the CPU exactly as it is (CPU results stay the same to
the last digit). ``to_cpu`` makes checkpoints and model files portable between devices.
"""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from typing import Any

import torch

from deepopt.errors import ConfigError

__all__ = [
    "autocast",
    "available_devices",
    "check_precision",
    "configure_backends",
    "device_tags",
    "resolve_device",
    "start_device",
    "to_cpu",
]

# cuBLAS needs a fixed workspace for deterministic matmuls (CUDA docs, "Reproducibility").
CUBLAS_WORKSPACE = ":4096:8"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this process can use: "cpu", then each CUDA GPU or "mps"."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def resolve_device(spec: str) -> torch.device:
    """``train.device`` as a device that is there; ConfigError (exit 2) otherwise.

    ``auto`` is CUDA when available (under torchrun the process's LOCAL_RANK GPU, else
    cuda:0), else MPS, else the CPU; a bare ``cuda`` means the same GPU as ``auto``.
    """
    available = available_devices()
    if spec == "auto":
        if torch.cuda.is_available():
            return _local_cuda()
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cuda" and torch.cuda.is_available():
        return _local_cuda()
    if spec in available:
        return torch.device(spec)
    raise ConfigError(
        f"train.device {spec!r} is not available here; available: {', '.join(available)}"
    )


def _local_cuda() -> torch.device:
    """cuda:LOCAL_RANK under torchrun (one GPU per process), modulo the GPUs visible."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", rank % torch.cuda.device_count())


def check_precision(device: torch.device, precision: str) -> None:
    """ConfigError unless ``precision`` runs on ``device`` (fp16 needs CUDA's scaler)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision fp16 needs a CUDA device; on {device.type} use fp32 or bf16"
        )


def configure_backends(device: torch.device, *, deterministic: bool, tf32: bool) -> None:
    """CUDA's switches for ``train.deterministic`` and ``train.tf32``; call it before any
    CUDA tensor exists (CUBLAS_WORKSPACE_CONFIG is read when cuBLAS initializes). On the
    CPU and MPS nothing changes."""
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        # warn_only: a few CUDA backward kernels have no deterministic version (torch's
        # list includes AdaptiveAvgPool2d, used by the ResNets); they warn, not fail.
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing
    torch.backends.cudnn.deterministic = deterministic
    # Explicitly off unless asked: TF32 rounds matmul and convolution inputs to 10 bits.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def start_device(spec: str, precision: str, *, deterministic: bool, tf32: bool) -> torch.device:
    """What a stage does first (before any CUDA tensor): ``train.device`` resolved, its
    precision checked and its backends configured; ConfigError (exit 2) when refused."""
    device = resolve_device(spec)
    check_precision(device, precision)
    configure_backends(device, deterministic=deterministic, tf32=tf32)
    return device


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (bf16, fp16); fp32 runs as it is."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def device_tags(device: torch.device) -> dict[str, str]:
    """Where a run ran, as MLflow tags: the device, its name, and on CUDA the CUDA and
    cuDNN versions."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "device": f"cuda:{index}",
            "device_name": torch.cuda.get_device_name(index),
            "cuda_version": str(torch.version.cuda),
            "cudnn_version": str(torch.backends.cudnn.version()),  # type: ignore[no-untyped-call]
        }
    if device.type == "mps":
        return {"device": "mps", "device_name": f"Apple MPS ({platform.machine()})"}
    return {
        "device": "cpu",
        "device_name": _cpu_model() or platform.processor() or platform.machine(),
    }


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo on Linux, "" elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its nested dicts, lists and tuples on the CPU (the
    same structure; CPU tensors are returned as they are, not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(value) for value in obj)
    return obj
