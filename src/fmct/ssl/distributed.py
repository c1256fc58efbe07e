"""torch.distributed for pretraining: DDP or FSDP2 wrapping (the process group itself: :mod:`fmct.distributed`).

The student is replicated with DDP or sharded with FSDP2
(``fully_shard`` per transformer block, then the whole model); the teacher, which never needs a
gradient, is left replicated under DDP (each rank applies the same EMA) and sharded like the student
under FSDP2 (so that teacher and student shards line up for the EMA).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from fmct.devices import unwrap
from fmct.distributed import DistEnv


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


def whole_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``model`` without its data-parallel wrapping: under FSDP2 a new ``build()`` module holding the
    whole weights on every rank (a collective: every rank calls it), else the wrapped module itself.

    A sharded module works only while its process group lives, and it keeps that group referenced: a
    run that returned one would tear the group down at interpreter exit, where gloo can abort the
    process after a finished run.
    """
    if not any(_is_dtensor(parameter) for parameter in model.parameters()):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(whole.values())).device
    copy = build().to(device)
    copy.load_state_dict(whole)
    return copy.train(model.training).requires_grad_(any(p.requires_grad for p in model.parameters()))


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
