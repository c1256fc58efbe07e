"""Peak memory of the DINO and iBOT losses over 65,536 prototypes in one ViT-B step, whole and in chunks.

The part of a step at batch 64 that grows with the prototypes, in the trainer's dtypes (bf16 head
outputs under autocast, fp32 targets and loss arithmetic):

- targets: Sinkhorn-Knopp on the teacher's (rows, K) bf16 logits -> fp32 probabilities (no gradient;
  before the student's forward pass, so its peak does not add to the student's activations);
- loss: the student's (rows, K) bf16 logits and the targets -> loss, forward and backward. This part
  comes on top of the student backbone's activations, so it is the part the chunks are for.

for iBOT (the M masked patch tokens of the 2 x B global crops, M from the masks the trainer draws:
about 9,800 at B = 64) and DINO (2 global + 8 local crops per volume). The loss runs whole (chunk 0)
and in chunks (``ibot.chunk_rows`` masked tokens, ``dino.chunk_size`` images at a time), on the same
inputs in the same process, and the losses and logit gradients of the two are compared. The head's
last layer (logits = bottleneck @ prototypes^T) is the same in both and left out: its gradient
(rows, K) in bf16 is in both the logit gradient measured here.

Peak: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before; on the CPU the peak
resident set size (Linux VmHWM, reset through /proc/self/clear_refs before each part) above the
resident size before it. torch's CPU allocations are invisible to tracemalloc; the benchmark has
glibc mmap every allocation of 64 KiB or more (``mallopt(M_MMAP_THRESHOLD)``), which is given back
when freed, so the resident size follows the live tensors. On the CPU the default batch is 16 (M
about 2,450) and every figure is linear in the batch. Prints one JSON line.

    python benchmarks/head_loss_memory.py [--batch 64] [--prototypes 65536]
        [--ibot-chunk-rows 1024] [--dino-chunk-size 16]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import platform
import time
from typing import Callable

import torch

from fmct.data import sample_ibot_masks
from fmct.ssl.centering import sinkhorn_knopp
from fmct.ssl.dino_loss import DINOLoss
from fmct.ssl.ibot_loss import iBOTPatchLoss

GRID = (8, 8, 8)  # 96^3 crops, patch 12
N_GLOBAL, N_LOCAL = 2, 8
TEACHER_TEMP, STUDENT_TEMP = 0.07, 0.1
LOGIT_SCALE = 1.0  # cosine logits of unit-norm prototypes (their norms start at 1)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, float, object]:
    """Peak memory of ``fn()`` above the memory in use before it (see the module docstring), its
    seconds and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := the current resident size
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _status_bytes("VmHWM") - before
    return peak, time.perf_counter() - start, result


def loss_memory(
    name: str,
    loss_module: Callable[[int], torch.nn.Module],
    inputs: tuple[torch.Tensor, ...],
    chunk: int,
    device: torch.device,
) -> dict:
    """Loss forward + backward, whole and in ``chunk``: peak MB, seconds, largest differences.

    ``loss_module(chunk)`` builds the loss, which is called on ``inputs``; its first input is the student's
    logits, whose gradient is compared. The tensors are passed in rather than captured by a closure, so the
    caller's ``del`` of them frees them once this returns."""
    logits = inputs[0]
    results = {}
    for label, size in (("whole", 0), ("chunked", chunk)):
        logits.grad = None

        def step() -> torch.Tensor:
            loss = loss_module(size)(*inputs)
            loss.backward()
            return loss.detach().double()

        peak, seconds, loss = peak_bytes(step, device)
        results[label] = (peak, seconds, loss, logits.grad.detach().clone())
        logits.grad = None
    (peak_whole, seconds_whole, loss_whole, grad_whole), (peak_chunked, seconds_chunked, loss_chunked, grad_chunked) = (
        results["whole"],
        results["chunked"],
    )
    return {
        f"{name}_chunk": chunk,
        f"{name}_loss_peak_mb_whole": round(peak_whole / 2**20, 1),
        f"{name}_loss_peak_mb_chunked": round(peak_chunked / 2**20, 1),
        f"{name}_loss_peak_ratio": round(peak_whole / max(peak_chunked, 1), 2),
        f"{name}_loss_seconds_whole": round(seconds_whole, 3),
        f"{name}_loss_seconds_chunked": round(seconds_chunked, 3),
        f"{name}_loss": float(loss_whole),
        f"{name}_loss_rel_diff": float((loss_whole - loss_chunked).abs() / loss_whole.abs()),
        f"{name}_logit_grad_max_abs_diff": float((grad_whole.float() - grad_chunked.float()).abs().max()),
        f"{name}_logit_grad_max_abs": float(grad_whole.float().abs().max()),
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64 if cuda else 16, help="volumes per step")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--ibot-chunk-rows", type=int, default=1024, help="masked tokens per chunk (ibot.chunk_rows)")
    parser.add_argument("--dino-chunk-size", type=int, default=16, help="images per chunk (dino.chunk_size)")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda and not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: the CPU peak would not follow the live tensors")
    generator = torch.Generator(device).manual_seed(0)

    def logits(*shape: int, requires_grad: bool = False) -> torch.Tensor:
        values = torch.randn(*shape, device=device, generator=generator) * LOGIT_SCALE
        return values.to(torch.bfloat16).requires_grad_(requires_grad)

    # Once, small and unmeasured: the first checkpointed backward imports modules, which count as resident memory.
    tiny = torch.zeros(4, 8, device=device, requires_grad=True)
    iBOTPatchLoss(8, STUDENT_TEMP, 2)(
        tiny, torch.full((4, 8), 1 / 8, device=device), torch.ones(1, 4, dtype=torch.bool, device=device)
    ).backward()
    masks = sample_ibot_masks(N_GLOBAL * args.batch, GRID, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0)).to(device)
    n_masked, k = int(masks.sum()), args.prototypes
    figures = {
        "benchmark": "head_loss_memory",
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtypes": "bf16 logits, fp32 targets and loss arithmetic (as under autocast)",
        "batch": args.batch,
        "prototypes": k,
        "ibot_masked_tokens": n_masked,
        "fp32_rows_x_prototypes_mb": round(n_masked * k * 4 / 2**20, 1),
        "peak_measure": "torch.cuda.max_memory_allocated" if cuda else "VmHWM above VmRSS (Linux)",
    }

    teacher_patch = logits(n_masked, k)
    peak, seconds, patch_targets = peak_bytes(functools.partial(sinkhorn_knopp, teacher_patch, TEACHER_TEMP), device)
    del teacher_patch
    figures.update(ibot_targets_peak_mb=round(peak / 2**20, 1), ibot_targets_seconds=round(seconds, 3))
    student_patch = logits(n_masked, k, requires_grad=True)
    figures.update(
        loss_memory(
            "ibot",
            lambda chunk: iBOTPatchLoss(k, STUDENT_TEMP, chunk),
            (student_patch, patch_targets, masks),
            args.ibot_chunk_rows,
            device,
        )
    )
    del student_patch, patch_targets

    teacher_cls = logits(N_GLOBAL * args.batch, k)
    cls_targets = sinkhorn_knopp(teacher_cls, TEACHER_TEMP).view(N_GLOBAL, args.batch, k)
    student_cls = logits(N_GLOBAL + N_LOCAL, args.batch, k, requires_grad=True)
    figures.update(
        loss_memory(
            "dino",
            lambda chunk: DINOLoss(k, STUDENT_TEMP, chunk),
            (student_cls, cls_targets),
            args.dino_chunk_size,
            device,
        )
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
