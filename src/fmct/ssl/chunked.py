"""Sums over row chunks whose intermediates are recomputed in the backward pass, to bound the memory of
the losses over 65,536 prototypes.

The DINO and iBOT losses are sums over rows (images, masked patches) of a cross-entropy over K logits.
Computed at once, autograd keeps several (rows, K) float32 tensors (the fp32 copy of the logits, the
log-softmax, the product with the teacher's probabilities, their gradients): at batch 64, ~10,000
masked patches x 65,536 prototypes, each is 2.6 GB. :func:`chunked_sum` evaluates the sum chunk by
chunk under activation checkpointing (``torch.utils.checkpoint``, non-reentrant), so only one chunk's
intermediates exist at a time, in the forward and again in the backward pass. The value and the
gradients are those of the whole computation; only the order of the float additions changes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint


def chunked_sum(
    fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], chunk_size: int, dim: int = 0
) -> torch.Tensor:
    """``fn(*tensors)`` for a ``fn`` that is a sum over index ``dim`` of its inputs, in chunks.

    The tensors are split into pieces of ``chunk_size`` along ``dim`` (all the same length there) and
    ``fn`` of each piece is summed; each piece's intermediates are dropped after its forward and
    recomputed in the backward pass. ``chunk_size`` 0, or at least the length, calls ``fn`` once
    without checkpointing. ``fn`` must draw no random numbers (they would differ when recomputed).
    """
    length = tensors[0].shape[dim]
    if any(t.shape[dim] != length for t in tensors):
        raise ValueError(f"chunked_sum: lengths along dim {dim} differ: {[t.shape[dim] for t in tensors]}")
    if chunk_size <= 0 or length <= chunk_size:
        return fn(*tensors)
    pieces = zip(*(t.split(chunk_size, dim=dim) for t in tensors))
    return sum(checkpoint(fn, *piece, use_reentrant=False) for piece in pieces)
