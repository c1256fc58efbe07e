"""torch.distributed for pretraining: process setup from torchrun's environment, DDP or FSDP2 wrapping.

A single process (no ``WORLD_SIZE`` in the environment, or 1) runs without a process group. Under
``torchrun --nproc_per_node N`` each process reads RANK, LOCAL_RANK and WORLD_SIZE and joins a group:
NCCL on CUDA, gloo on a CPU. The student is replicated with DDP or sharded with FSDP2
(``fully_shard`` per transformer block, then the whole model); the teacher, which never needs a
gradient, is left replicated under DDP (each rank applies the same EMA) and sharded like the student
under FSDP2 (so that teacher and student shards line up for the EMA).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment (if any) and pick this process's device.

    ``device`` "auto" means ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=chosen if chosen.type == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, chosen)


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_student(model: nn.Module, env: DistEnv, sharding: str) -> nn.Module:
    """The student ready for data-parallel training: unchanged on one process, else DDP or FSDP2."""
    if not env.distributed:
        return model
    if sharding == "fsdp":
        return shard(model)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def wrap_teacher(model: nn.Module, env: DistEnv, sharding: str) -> nn.Module:
    """The teacher: sharded exactly like the student under FSDP2, otherwise left whole on every rank."""
    if env.distributed and sharding == "fsdp":
        return shard(model)
    return model


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block (of the backbone and of an MAE decoder) its own unit, then the rest."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block)
    fully_shard(model)
    return model


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # A DTensor exists only once FSDP2 has imported torch.distributed.tensor; importing it here would
    # add a second to every start of the command.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter, or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. FSDP2's gradient norm), or the tensor itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over ranks (``op`` "sum" or "max") when running distributed; return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, a new tensor (the tensor itself on one process)."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return all_reduce_(tensor.clone()) / world_size if world_size > 1 else tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks, a new tensor (the tensor itself on one process)."""
    return all_reduce_(tensor.clone(), op="max") if dist.is_available() and dist.is_initialized() else tensor
