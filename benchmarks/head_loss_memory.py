"""Peak memory of the DINO and iBOT heads + losses of one pretraining step, computed whole and in chunks.

The part of a ViT-B step at batch 64 that grows with the 65,536 prototypes: the teacher's targets
(head forward without gradient, Sinkhorn-Knopp) and the student's head, loss and backward, for

- iBOT: the M masked patch tokens of the 2 x B global crops (M from the masks the trainer draws:
  about 9,800 at B = 64), features (M, 768) -> (M, 65536) logits;
- DINO: the CLS tokens of 2 global + 8 local crops per volume, teacher (2, B, 65536), student (10, B, 65536).

Each is run whole (``chunk 0``) and in chunks (``ibot.chunk_rows`` masked tokens, ``dino.chunk_size``
images at a time, :func:`fmct.ssl.chunked.chunked_sum`), on the same inputs in the same process, and
the loss and every head gradient of the two are compared. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before; on the CPU the peak resident set
size (Linux VmHWM, reset through /proc/self/clear_refs before each variant) above the resident size
before it (torch's CPU allocations are invisible to tracemalloc; tensors this large are mmap'ed and
given back on free, so the resident size follows the live tensors).

On CUDA: batch 64, bf16 autocast as in training. On the CPU (no GPU here): batch 16 by default
(M about 2,450), fp32; every figure is linear in the batch. Prints one JSON line.

    python benchmarks/head_loss_memory.py [--batch 64] [--prototypes 65536] [--ibot-chunk-rows 2048] [--dino-chunk-size 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable

import torch

from fmct.data import sample_ibot_masks
from fmct.models import DINOHead
from fmct.ssl.centering import sinkhorn_knopp
from fmct.ssl.dino_loss import DINOLoss
from fmct.ssl.ibot_loss import iBOTPatchLoss

EMBED_DIM = 768  # ViT-B
GRID = (8, 8, 8)  # 96^3 crops, patch 12
N_GLOBAL, N_LOCAL = 2, 8
TEACHER_TEMP, STUDENT_TEMP = 0.07, 0.1


def _rss_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory of ``fn()`` above the memory in use before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    fn()
    return _rss_bytes("VmHWM") - before


def measure(name: str, loss_of: Callable[[int], torch.Tensor], heads: list[DINOHead], inputs: list[torch.Tensor],
            chunk: int, device: torch.device) -> dict:
    """Whole vs ``chunk``: peak MB, seconds, and the largest difference of loss and gradients."""
    results = {}
    for label, size in (("whole", 0), ("chunked", chunk)):
        for tensor in [*inputs, *(p for head in heads for p in head.parameters())]:
            tensor.grad = None
        out = {}

        def step() -> None:
            start = time.perf_counter()
            loss = loss_of(size)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["seconds"] = time.perf_counter() - start
            out["loss"] = loss.detach().double()

        out["peak"] = peak_bytes(step, device)
        out["grads"] = [t.grad.detach().clone() for t in [*inputs, *(p for head in heads for p in head.parameters())]
                        if t.grad is not None]
        results[label] = out
    whole, chunked = results["whole"], results["chunked"]
    grad_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(whole["grads"], chunked["grads"]))
    grad_scale = max(float(g.float().abs().max()) for g in whole["grads"])
    return {
        f"{name}_chunk": chunk,
        f"{name}_peak_mb_whole": round(whole["peak"] / 2**20, 1),
        f"{name}_peak_mb_chunked": round(chunked["peak"] / 2**20, 1),
        f"{name}_peak_ratio": round(whole["peak"] / max(chunked["peak"], 1), 2),
        f"{name}_seconds_whole": round(whole["seconds"], 3),
        f"{name}_seconds_chunked": round(chunked["seconds"], 3),
        f"{name}_loss_abs_diff": float((whole["loss"] - chunked["loss"]).abs()),
        f"{name}_grad_max_abs_diff": grad_diff,
        f"{name}_grad_max_abs": grad_scale,
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64 if cuda else 16, help="volumes per step")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--ibot-chunk-rows", type=int, default=2048, help="masked tokens per chunk")
    parser.add_argument("--dino-chunk-size", type=int, default=16, help="images per chunk")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    masks = sample_ibot_masks(N_GLOBAL * args.batch, GRID, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0)).to(device)
    n_masked = int(masks.sum())
    torch.manual_seed(0)
    student_head = DINOHead(EMBED_DIM, args.prototypes).to(device)
    teacher_head = DINOHead(EMBED_DIM, args.prototypes).to(device).requires_grad_(False)
    patch_student = torch.randn(n_masked, EMBED_DIM, device=device, requires_grad=True)
    patch_teacher = torch.randn(n_masked, EMBED_DIM, device=device)
    cls_student = torch.randn((N_GLOBAL + N_LOCAL) * args.batch, EMBED_DIM, device=device, requires_grad=True)
    cls_teacher = torch.randn(N_GLOBAL * args.batch, EMBED_DIM, device=device)

    def ibot_loss(chunk_rows: int) -> torch.Tensor:
        with autocast:
            with torch.no_grad():
                targets = sinkhorn_knopp(teacher_head(patch_teacher), TEACHER_TEMP)
            return iBOTPatchLoss(args.prototypes, STUDENT_TEMP, chunk_rows)(student_head(patch_student), targets, masks)

    def dino_loss(chunk_size: int) -> torch.Tensor:
        with autocast:
            with torch.no_grad():
                targets = sinkhorn_knopp(teacher_head(cls_teacher), TEACHER_TEMP).view(N_GLOBAL, args.batch, -1)
            logits = student_head(cls_student).view(N_GLOBAL + N_LOCAL, args.batch, -1)
            return DINOLoss(args.prototypes, STUDENT_TEMP, chunk_size)(logits, targets)

    figures = {
        "benchmark": "head_loss_memory",
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bf16 autocast" if cuda else "fp32",
        "batch": args.batch,
        "prototypes": args.prototypes,
        "ibot_masked_tokens": n_masked,
        "peak_measure": "torch.cuda.max_memory_allocated" if cuda else "VmHWM above VmRSS (Linux)",
    }
    figures.update(measure("ibot", ibot_loss, [student_head], [patch_student], args.ibot_chunk_rows, device))
    figures.update(measure("dino", dino_loss, [student_head], [cls_student], args.dino_chunk_size, device))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
