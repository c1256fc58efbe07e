"""The process group of a torchrun job: this process's rank, its device, and reductions over ranks.

A single process (no ``WORLD_SIZE`` in the environment, or 1) runs without a process group. Under
``torchrun`` (one machine, ``--nproc-per-node N``, or several, ``--nnodes M --node-rank K``) each
process reads RANK, LOCAL_RANK and WORLD_SIZE and joins a group: NCCL on CUDA, gloo on a CPU. RANK
numbers the processes of the whole job (it decides which data a process handles), LOCAL_RANK those of
one machine (it decides the GPU). Used by ``fmct pretrain`` (:mod:`fmct.ssl.distributed` wraps the
models) and ``fmct embed`` (each rank embeds its share of the store).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over ranks (``op`` "sum" or "max") when running distributed; return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, a new tensor (the tensor itself on one process)."""
    return all_reduce_(tensor.clone()) if _world_size() > 1 else tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, a new tensor (the tensor itself on one process)."""
    return all_reduce_(tensor.clone()) / _world_size() if _world_size() > 1 else tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks, a new tensor (the tensor itself on one process)."""
    return all_reduce_(tensor.clone(), op="max") if _world_size() > 1 else tensor
