"""The CPU pretraining step of a shipped recipe, under the settings that could make it faster.

What ``fmct pretrain`` runs per step (:meth:`fmct.ssl.train.Trainer.step`: augmentation, masks, forward,
backward, clipping, AdamW) for the recipe of ``--config`` (default ``pretrain_synth_tiny``, the shipped
CPU-scale checkpoint's), timed side by side in one process on the same synthetic int16 batch:

- ``eager``: fp32, as ``fmct pretrain`` runs on a CPU by default (the reference);
- ``compiled_blocks``: ``engine.compile=true`` (``torch.compile`` of each transformer block);
- ``compiled_stem``: the blocks and the convolutional stem compiled;
- ``channels_last``: the stem's activations in ``torch.channels_last_3d``;
- ``threads_1``: one intra-op thread instead of all cores.

The variants take turns step by step (median of the timed steps). Prints one JSON line: seconds per step
and volumes/s of each, and the speed-up over eager.

    python benchmarks/cpu_step.py [--config pretrain_synth_tiny] [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fmct.config import load_config
from fmct.distributed import DistEnv
from fmct.ssl.config import PretrainConfig
from fmct.ssl.schedules import Schedules
from fmct.ssl.train import Trainer, compile_blocks


def head_batch(batch: int, size: int) -> torch.Tensor:
    """int16 HU volumes (batch, 1, size^3): air, a skull shell, brain, with noise."""
    axis = torch.linspace(-1, 1, size)
    radius = torch.sqrt(sum(a**2 for a in torch.meshgrid(axis, axis, axis, indexing="ij")))
    head = torch.where(radius < 0.9, torch.where(radius < 0.8, 35, 1200), -1000).to(torch.int16)
    return head + torch.randint(-10, 11, (batch, 1, size, size, size), dtype=torch.int16)


def build_trainer(config: PretrainConfig, variant: str) -> Trainer:
    """A fresh trainer of ``config`` set up as ``variant`` says."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    # The head batch stands for the demo store's grid (64^3 x 3 mm), where an anomaly recipe paints in mm.
    trainer = Trainer(config, env, Schedules(config, global_batch=config.optim.batch_size), spacing_mm=3.0)
    backbone = trainer.student.backbone
    if variant in ("compiled_blocks", "compiled_stem"):
        compile_blocks([trainer.student])
    if variant == "compiled_stem":
        backbone.patch_embed.compile(dynamic=False)
    if variant == "channels_last":
        backbone.patch_embed.to(memory_format=torch.channels_last_3d)
    return trainer


def timed_steps(trainers: dict[str, Trainer], hu: torch.Tensor, steps: int, warmup: int) -> dict[str, float]:
    """Median wall seconds per step of each trainer after ``warmup`` untimed steps; the variants take turns
    step by step, so that a machine slowing down or speeding up weighs on all of them alike."""
    threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {variant: [] for variant in trainers}
    step = 1000  # past the warm-up of every schedule
    for round_ in range(warmup + steps):
        for variant, trainer in trainers.items():
            torch.set_num_threads(1 if variant == "threads_1" else threads)
            start = time.perf_counter()
            trainer.step(hu, step + round_)
            if round_ >= warmup:
                seconds[variant].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {variant: statistics.median(values) for variant, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pretrain_synth_tiny", help="a shipped pretraining config or a YAML path")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--store-size", type=int, default=64, help="side of the canonical int16 volumes (voxels)")
    args = parser.parse_args()

    config = load_config(PretrainConfig, args.config, ["engine.device=cpu", "engine.compile=false"])
    hu = head_batch(config.optim.batch_size, args.store_size)
    variants = ("eager", "compiled_blocks", "compiled_stem", "channels_last", "threads_1")
    timings = timed_steps(
        {variant: build_trainer(config, variant) for variant in variants}, hu, args.steps, args.warmup
    )
    batch = config.optim.batch_size
    print(
        json.dumps(
            {
                "benchmark": "cpu_step",
                "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "config": args.config,
                "method": config.method,
                "batch": batch,
                "reference": "eager",
                **{f"{variant}_seconds_per_step": round(seconds, 3) for variant, seconds in timings.items()},
                **{f"{variant}_volumes_per_s": round(batch / seconds, 2) for variant, seconds in timings.items()},
                **{
                    f"{variant}_speedup": round(timings["eager"] / seconds, 2)
                    for variant, seconds in timings.items()
                    if variant != "eager"
                },
            }
        )
    )


if __name__ == "__main__":
    main()
