"""Where models run: the default device, the precision on it, and the model inside a wrapper.

fp32 on a CPU (bf16 autocast is many times slower there), bf16 autocast on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; None: CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, bf16: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA (unless ``bf16`` is false); disabled (fp32) elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside its wrappers: DDP keeps it in ``.module``, ``torch.compile`` in ``._orig_mod``
    (FSDP2 shards in place, so its model is already the module)."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def one_cpu_thread() -> None:
    """torch and the BLAS/OpenMP pools on one thread for the rest of this process: for worker processes,
    whose number sets the parallelism (ingest's and predict's readers)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # applied now and kept: not used as a context
