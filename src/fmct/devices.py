"""Where models run: the default device, the precision on it, the model inside a wrapper, and how a
worker process that handles one volume after another uses its CPU and memory.

fp32 on a CPU (bf16 autocast is many times slower there), bf16 autocast on CUDA.
"""

from __future__ import annotations

import ctypes
import sys

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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>


def keep_freed_memory(limit_bytes: int = 2**30) -> None:
    """Keep the memory this process frees (blocks up to ``limit_bytes``) for its next allocations instead
    of handing it back to the kernel: for worker processes that handle one volume after another. glibc
    only (Linux); elsewhere nothing changes.

    By default glibc returns every large block (a stack of slices, a resampled volume) to the kernel when
    it is freed, so the next scan's arrays fault in fresh zeroed pages again: on the 2-core VM of
    BENCHMARKS.md that cost 0.2-0.9 s of system time per 240-slice scan, as much as reading it. A worker
    that keeps its few hundred MB reuses them scan after scan.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its allocator, its defaults
        return
    libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * limit_bytes)


def setup_volume_worker() -> None:
    """Set up a worker process that handles one volume after another, whose number sets the parallelism
    (ingest's and predict's readers): :func:`one_cpu_thread` and :func:`keep_freed_memory`."""
    one_cpu_thread()
    keep_freed_memory()
