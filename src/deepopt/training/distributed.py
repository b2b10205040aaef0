"""Data-parallel training under ``torchrun``: the process group and what the loop needs of it.

``torchrun --nproc_per_node=N -m deepopt train`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; ``join_from_env`` sees them and joins the group. Each
process takes its shard of every global batch of ``world_size * train.batch_size`` samples
(``train.batch_size`` is per process), ``DistributedDataParallel`` averages the gradients,
and epoch metrics are summed over all processes, so N processes with batch b train as one
process with batch N*b. Rank 0 alone writes files and talks to MLflow; the others follow it
(``broadcast``: where to start, e.g. rank 0's checkpoint).

The device is ``train.device`` (``join_from_env``'s ``device``). On the CPU the backend is
gloo. On CUDA it is NCCL (``backend_for``) with one GPU per process, GPU ``LOCAL_RANK``
(``local_device``; choose the GPUs with ``CUDA_VISIBLE_DEVICES``), so a ``cuda:N`` naming
one GPU for all processes is refused, and so is MPS, which has no collective backend.
``train.sync_batchnorm`` normalizes over the global batch: torch's SyncBatchNorm on CUDA,
and on the CPU (where torch refuses it) ``GlobalBatchNorm``, the same computation with the
statistics summed over processes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepopt.devices import resolve_device
from deepopt.errors import ConfigError
from deepopt.training.loop import evaluate_logits

__all__ = [
    "GlobalBatchNorm",
    "ProcessGroup",
    "backend_for",
    "check_parallel_device",
    "default_threads",
    "join_from_env",
    "local_device",
    "synchronize_batchnorm",
]

_T = TypeVar("_T")
_CPU = torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors when torch has it, gloo otherwise (CPU tensors need gloo)."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the torchrun process with ``local_rank`` when the run's device is
    ``device``: GPU ``LOCAL_RANK`` on CUDA (one per process), else ``device`` itself."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def check_parallel_device(spec: str, world_size: int) -> None:
    """Refuse a ``train.device`` that ``world_size`` torchrun processes cannot share: an
    explicit ``cuda:N`` (each process takes the GPU of its LOCAL_RANK) and ``mps``."""
    if world_size <= 1:
        return
    if spec.startswith("cuda:"):
        raise ConfigError(
            f"train.device {spec!r} with torchrun (WORLD_SIZE={world_size}): each process "
            "takes the GPU of its LOCAL_RANK; set train.device to cuda or auto (choose the "
            "GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if spec == "mps":
        raise ConfigError(
            f"train.device 'mps' with torchrun (WORLD_SIZE={world_size}): torch.distributed "
            "has no MPS backend; use cpu (gloo) or cuda (NCCL)"
        )


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(
                f"{name} is not set but WORLD_SIZE is; start data-parallel runs with torchrun"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number (torchrun sets it)") from None
    if value < 0:
        raise ConfigError(f"{name}={value}: must be >= 0")
    return value


def default_threads() -> int:
    """Torch threads per process when train.threads is null: the cores shared among this
    machine's processes (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    per_machine = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 1) // per_machine)


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) that autograd differentiates: every process's input feeds the sum
    that every process uses, so an input's gradient is the sum of all processes' gradients
    of that sum."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all processes, for
    CPU tensors (torch's SyncBatchNorm takes GPU tensors only).

    Each process sums its shard's values and squares per channel; one differentiable
    all-reduce adds them up, so the gradients flow through the global statistics as in
    SyncBatchNorm. Eval mode is plain BatchNorm with the running statistics.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return nn.functional.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]  # all but the channel dimension
        values = input.double()  # float64 sums: E[x^2] - E[x]^2 keeps float32 precision
        count = torch.full((1,), input.numel() / channels, dtype=torch.float64)
        local = torch.cat([values.sum(dims), (values * values).sum(dims), count])
        total: torch.Tensor = _SumOverProcesses.apply(local)
        samples = total[-1]
        mean = total[:channels] / samples
        var = total[channels : 2 * channels] / samples - mean * mean  # biased, as BatchNorm
        if self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach(), samples.item())
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype).view(shape)
        output = (input - mean.to(input.dtype).view(shape)) * scale
        if self.weight is not None and self.bias is not None:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, samples: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        # momentum None: a cumulative average, as BatchNorm
        factor = 1.0 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * samples / max(samples - 1.0, 1.0)
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype) * factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype) * factor)


def synchronize_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm normalizing over the global batch (in place, as
    torch's convert_sync_batchnorm): SyncBatchNorm for CUDA, GlobalBatchNorm for CPU.

    The new layers take over the old ones' parameters and buffers, so an optimizer built
    before still updates them and state dicts keep their keys.
    """
    if next(model.parameters()).device.type == "cuda":
        converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
        return converted
    return _to_global_batchnorm(model)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        layer = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            layer.weight, layer.bias = module.weight, module.bias
        layer.running_mean = module.running_mean
        layer.running_var = module.running_var
        layer.num_batches_tracked = module.num_batches_tracked
        layer.train(module.training)
        return layer
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child))
    return module


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel job (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    sync_batchnorm: bool = False
    device: torch.device = _CPU  # this process's: cuda:LOCAL_RANK on CUDA

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and records in MLflow."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel, its BatchNorms synchronized when asked
        (``model`` itself then holds the synchronized layers: see synchronize_batchnorm)."""
        if self.sync_batchnorm:
            model = synchronize_batchnorm(model)
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """This process's part of a global batch ``index`` and the weight of its loss.

        The parts differ by at most one sample; the weight (1.0 for equal parts) makes
        DDP's mean of the processes' gradients the gradient of the global batch's mean
        loss. None when the batch has fewer samples than processes (the epoch's last
        step is then skipped: every process must take part in each step).
        """
        total = len(index)
        if total < self.world_size:
            return None
        part = torch.tensor_split(index, self.world_size)[self.rank]
        return part, self.world_size * len(part) / total

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all processes, in place (on ``device``: NCCL takes CUDA
        tensors only, gloo CPU tensors)."""
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def evaluate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        precision: str,
    ) -> tuple[float, float]:
        """Mean loss and accuracy over all ``images``: each process scores a contiguous
        shard and the sums are all-reduced, so every process gets the same numbers and
        takes the same early-stopping and schedule decisions."""
        for buffer in model.buffers():
            # BatchNorm running statistics differ per process without SyncBatchNorm; rank
            # 0's are the ones DDP broadcasts at the next forward and the ones saved.
            dist.broadcast(buffer, src=0)
        begin, end = _bounds(len(images), self.world_size, self.rank)
        # loss sum, correct count; on the group's device (NCCL reduces CUDA tensors only)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if end > begin:
            logits = evaluate_logits(model, images[begin:end], batch_size, precision)
            targets = labels[begin:end]
            sums[0] = nn.functional.cross_entropy(logits, targets, reduction="sum").double()
            sums[1] = (logits.argmax(dim=1) == targets).sum().double()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        loss, correct = (sums / len(images)).tolist()
        return loss, correct

    def broadcast(self, value: _T) -> _T:
        """Rank 0's ``value`` on every process (plain data and tensors only)."""
        box: list[Any] = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        result: _T = box[0]
        return result


def _bounds(count: int, parts: int, which: int) -> tuple[int, int]:
    """[begin, end) of part ``which`` of ``count`` items split as torch.tensor_split does."""
    size, extra = divmod(count, parts)
    begin = which * size + min(which, extra)
    return begin, begin + size + (1 if which < extra else 0)


def join_from_env(sync_batchnorm: bool = False, device: str = "cpu") -> ProcessGroup | None:
    """Join the process group torchrun describes in the environment; None for one process.

    ``device`` is the run's ``train.device``: one that resolves to CUDA gives this process
    GPU ``LOCAL_RANK`` (made torch's current device) and NCCL; the CPU gives gloo. The group
    is left when the process exits. A malformed or incomplete environment, or a device the
    processes cannot share, is a ConfigError naming the variable or the setting.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank >= world_size:
        raise ConfigError(f"RANK={rank}: must be < WORLD_SIZE={world_size}")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    check_parallel_device(device, world_size)
    own = local_device(resolve_device(device), local_rank)
    if own.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but {visible} CUDA device(s) are visible: start at "
                f"most {visible} processes per machine (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(own)  # NCCL's and broadcast_object_list's current device
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(own), device_id=own if own.type == "cuda" else None
        )
        atexit.register(_leave)
    return ProcessGroup(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        sync_batchnorm=sync_batchnorm,
        device=own,
    )


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
