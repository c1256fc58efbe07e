"""Pretraining throughput: full DINO + iBOT + KoLeo training steps of fmct, in volumes/s and TFLOP/s.

A step is exactly the one ``fmct pretrain`` runs (:meth:`fmct.ssl.train.Trainer.step`): the int16 HU
batch copied from pinned memory to the device, multi-crop augmentation and iBOT masks there, teacher
and student passes, backward, clipping, AdamW, and the teacher's EMA. Only the store reading is left
out (the loader workers run ahead of the device). FLOPs are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on an uncompiled step (matmuls, convolutions, attention,
forward and backward); achieved TFLOP/s = counted FLOPs / measured step time.

On CUDA: ViT-B, 96^3 global crops, patch 12 (512 tokens), 2 global + 8 local 48^3 crops, 65536
prototypes, batch 64, bf16 autocast, fused AdamW, TF32, blocks compiled (``--no-compile`` to switch
off). Without a GPU: ViT-tiny, same crops and patch, batch 2, 8192 prototypes, fp32.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps, with the losses in
chunks as configured (``ibot.chunk_rows``, ``dino.chunk_size``), then over two more steps with both
losses whole (chunk 0), side by side; on the CPU the process's peak resident size (``ru_maxrss``).
Prints one JSON line of figures.

    python benchmarks/pretrain_step.py [--batch 64] [--steps 20] [--warmup 5] [--no-compile] [--model base]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fmct.config import load_config
from fmct.distributed import DistEnv
from fmct.ssl.config import PretrainConfig
from fmct.ssl.schedules import Schedules
from fmct.ssl.train import Trainer, compile_blocks, configure_torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device name; H200 has the H100 SXM's compute.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
REFERENCES = {
    "fm_ct_public_code_volumes_per_s_per_gpu": 3.0,  # 256 volumes / ~21 s per iteration on 4 A100 (FM-CT logs)
    # DINO+iBOT ViT-B step, bf16, SDPA, compiled, batch 64 (issue 4)
    "plain_pytorch_h200_model_only_volumes_per_s": 222.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak when known (CUDA only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def whole_loss_peak_gb(trainer: Trainer, hu: torch.Tensor, step: int, device: torch.device) -> float | str:
    """Peak CUDA memory (GiB) of two steps with the DINO and iBOT losses unchunked ("out of memory" if
    they do not fit); the chunk settings are restored afterwards."""
    dino_loss, ibot_loss = trainer.method.dino_loss, trainer.method.ibot_loss
    chunks = dino_loss.chunk_size, ibot_loss.chunk_rows
    dino_loss.chunk_size = ibot_loss.chunk_rows = 0
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for offset in range(2):
            trainer.step(hu, step + offset)
        torch.cuda.synchronize(device)
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except torch.OutOfMemoryError:
        trainer.optimizer.zero_grad(set_to_none=True)
        return "out of memory"
    finally:
        dino_loss.chunk_size, ibot_loss.chunk_rows = chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=["tiny", "small", "base", "large"], help="ViT size (default: base on CUDA, tiny on CPU)"
    )
    parser.add_argument("--batch", type=int, help="volumes per step (default: 64 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--prototypes", type=int, help="DINO prototypes (default: 65536 on CUDA, 8192 on CPU)")
    parser.add_argument("--store-size", type=int, default=128, help="side of the canonical int16 volumes (voxels)")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the blocks (CUDA)")
    parser.add_argument("--ibot-chunk-rows", type=int, help="ibot.chunk_rows (default: the config's, 1024)")
    parser.add_argument("--dino-chunk-size", type=int, help="dino.chunk_size (default: the config's, 0)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    model = args.model or ("base" if cuda else "tiny")
    batch = args.batch or (64 if cuda else 2)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup or (5 if cuda else 1)
    prototypes = args.prototypes or (65536 if cuda else 8192)
    compiled = cuda and not args.no_compile
    chunks = [f"ibot.chunk_rows={args.ibot_chunk_rows}"] if args.ibot_chunk_rows is not None else []
    chunks += [f"dino.chunk_size={args.dino_chunk_size}"] if args.dino_chunk_size is not None else []
    config = load_config(
        PretrainConfig,
        None,
        [
            f"model.size={model}",
            f"dino.n_prototypes={prototypes}",
            f"optim.batch_size={batch}",
            f"engine.device={device}",
            "engine.compile=false",
            *chunks,
        ],
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    configure_torch(config.engine, device)
    # A long run's schedules: every timed step is in the ordinary regime (prototypes trained, LR warm).
    schedules = Schedules(config, global_batch=batch)
    trainer = Trainer(config, env, schedules)
    n_params = sum(p.numel() for p in trainer.student.parameters())

    # Canonical int16 volumes in pinned memory, as the loader hands them over: air, a skull, a brain.
    size = args.store_size
    axis = torch.linspace(-1, 1, size)
    radius = torch.sqrt(sum(a**2 for a in torch.meshgrid(axis, axis, axis, indexing="ij")))
    head = torch.where(radius < 0.9, torch.where(radius < 0.8, 35, 1200), -1000).to(torch.int16)
    hu = head + torch.randint(-10, 11, (batch, 1, size, size, size), dtype=torch.int16)
    hu = hu.pin_memory() if cuda else hu

    step = 2000
    with FlopCounterMode(display=False) as counter:
        trainer.step(hu, step)
    flops_per_step = counter.get_total_flops()
    if compiled:
        compile_blocks([trainer.student, trainer.teacher])
    for step in range(step + 1, step + 1 + warmup):
        metrics = trainer.step(hu, step)
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(step + 1, step + 1 + steps):
        metrics = trainer.step(hu, step)
    synchronize(device)
    seconds_per_step = (time.perf_counter() - start) / steps
    loss = float(metrics["loss"].detach())
    memory = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if cuda:
        memory = {
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_memory_gb_whole_losses": whole_loss_peak_gb(trainer, hu, step + 1, device),
        }

    achieved = flops_per_step / seconds_per_step / 1e12
    peak = peak_tflops(device)
    augment = config.augment
    print(
        json.dumps(
            {
                "benchmark": "pretrain_step",
                "device": torch.cuda.get_device_name(device)
                if cuda
                else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "model": f"ViT-{model} {config.model.img_size[0]}^3 patch {config.model.patch_size[0]}",
                "parameters_m": round(n_params / 1e6, 1),
                "crops": f"{augment.n_global} x {augment.global_size}^3 + {augment.n_local} x {augment.local_size}^3",
                "prototypes": prototypes,
                "ibot_chunk_rows": config.ibot.chunk_rows,
                "dino_chunk_size": config.dino.chunk_size,
                "batch": batch,
                "dtype": "bf16 autocast" if cuda else "fp32",
                "compiled": compiled,
                "seconds_per_step": round(seconds_per_step, 4),
                "volumes_per_s": round(batch / seconds_per_step, 2),
                "tflop_per_step": round(flops_per_step / 1e12, 3),
                "achieved_tflops": round(achieved, 2),
                "peak_tflops": peak,
                "mfu": round(achieved / peak, 3) if peak else None,
                **memory,
                "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
                "references": REFERENCES,
            }
        )
    )


if __name__ == "__main__":
    main()
