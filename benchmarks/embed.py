"""Embedding throughput: scans/s of `fmct embed` end to end (store -> embeddings table), next to the
forward pass alone measured in the same process on the same device.

The store holds canonical 128^3 int16 volumes (1.5 mm) in the default codec of fmct.codec: ``--distinct``
different head phantoms written once, the other scan ids hard links to them. Every scan is still read
and decoded in full, but from a warm page cache (the store's bytes fit in memory): this measures fmct's
pipeline, not the disk.

Figures:
- ``end_to_end_scans_per_s``: scans / wall time of one ``embed_store`` call over ``--scans`` scans
  (model load, torch.compile, reading, transfer, resize + windows, forward, chunk and table writes);
- ``steady_scans_per_s``: (N - N/4) / (T(N) - T(N/4)) from two fresh runs of N and N/4 scans, which
  cancels the fixed costs (model load, compilation) and leaves the rate of a long job;
- ``forward_only_volumes_per_s``: ``model.forward_features`` alone on a device-resident (B, 3, 96, 96, 96)
  batch, same compile and precision, no data.

On CUDA the model is ViT-B (96^3, patch 12, 4 registers), bf16, compiled; on the CPU a ViT-tiny of the
same geometry (fp32, eager). Prints one JSON line.

    python benchmarks/embed.py [--scans 8192] [--batch-size 256] [--workers 8] [--out /tmp/fmct-bench-embed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fmct import hub
from fmct.codec import DEFAULT_CODEC
from fmct.devices import autocast
from fmct.eval.embed import EmbedConfig, embed_store
from fmct.models import ViT3DConfig, build_vit3d
from fmct.store import rebuild_tables, scan_file, write_scan

STORE_SHAPE = (128, 128, 128)


def head_volume(rng: np.random.Generator) -> np.ndarray:
    """int16 HU (128^3, 1.5 mm, RAS): scalp, skull, brain with noise and a random bright lesion."""
    axes = [np.arange(n) - (n - 1) / 2 for n in STORE_SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radius = np.sqrt((x / 48) ** 2 + (y / 58) ** 2 + (z / 52) ** 2)
    hu = np.full(STORE_SHAPE, -1000.0, np.float32)
    hu[np.broadcast_to(radius < 1.05, STORE_SHAPE)] = 40
    hu[np.broadcast_to(radius < 1.0, STORE_SHAPE)] = 1100
    hu[np.broadcast_to(radius < 0.92, STORE_SHAPE)] = 33
    centre = rng.uniform(-25, 25, size=3)
    lesion = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < rng.uniform(4, 12) ** 2
    hu[lesion] = 70
    hu += rng.normal(0, 6, size=STORE_SHAPE).astype(np.float32)
    return np.round(hu).astype(np.int16)


def build_store(path: Path, n_scans: int, n_distinct: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n_scans):
        scan_id = f"b{i:06d}"
        row = {
            "scan_id": scan_id,
            "patient_key": f"p{i:06d}",
            "source": f"/bench/{scan_id}",
            "store_shape": list(STORE_SHAPE),
            "store_spacing_mm": [1.5] * 3,
        }
        if i < n_distinct:
            write_scan(path, head_volume(rng), row)
        else:  # a hard link: a separate scan file to read, without writing its bytes again
            volume = scan_file(path, f"b{i % n_distinct:06d}")
            os.link(volume, volume.with_name(f"{scan_id}{volume.suffix}"))
            (path / "scans" / f"{scan_id}.json").write_text(json.dumps(row))
    rebuild_tables(path)


def subset_store(source: Path, path: Path, n_scans: int) -> None:
    """A store of the first ``n_scans`` scans of ``source``, by hard links."""
    (path / "scans").mkdir(parents=True)
    for i in range(n_scans):
        for file in (scan_file(source, f"b{i:06d}"), source / "scans" / f"b{i:06d}.json"):
            os.link(file, path / "scans" / file.name)
    rebuild_tables(path)


def timed_embed(model_dir: Path, store: Path, out: Path, config: EmbedConfig, device: torch.device) -> float:
    shutil.rmtree(out, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embed_store(model_dir, store, out, config, device=device, progress=False)
    return time.perf_counter() - start


def forward_only(model, batch: int, iterations: int, compile_model: bool, device: torch.device) -> float:
    forward = torch.compile(model.forward_features) if compile_model else model.forward_features
    x = torch.rand(batch, 3, *model.config.img_size, device=device)
    with torch.no_grad(), autocast(device):
        for _ in range(3):  # compilation and autotuning
            forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * iterations / (time.perf_counter() - start)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8192 if cuda else 48)
    parser.add_argument("--batch-size", type=int, default=256 if cuda else 8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--distinct", type=int, default=64, help="different volumes written; the rest are hard links")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    parser.add_argument("--out", default="/tmp/fmct-bench-embed")
    args = parser.parse_args()
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if cuda else "cpu")

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    size = "base" if cuda else "tiny"
    torch.manual_seed(0)
    model = build_vit3d(ViT3DConfig(size=size, img_size=(96, 96, 96), patch_size=(12, 12, 12), n_registers=4))
    model_dir = hub.save(model, root / "model")
    build_store(root / "store", args.scans, min(args.distinct, args.scans))
    quarter = max(args.scans // 4, args.batch_size)
    subset_store(root / "store", root / "store_quarter", quarter)
    warmup = min(2 * args.batch_size, args.scans)
    subset_store(root / "store", root / "store_warmup", warmup)

    config = EmbedConfig(
        batch_size=args.batch_size, workers=args.workers, chunk_size=4 * args.batch_size, compile=args.compile
    )
    timed_embed(model_dir, root / "store_warmup", root / "emb_warmup", config, device)  # page cache, compile caches
    t_quarter = timed_embed(model_dir, root / "store_quarter", root / "emb_quarter", config, device)
    t_full = timed_embed(model_dir, root / "store", root / "emb", config, device)
    forward_rate = forward_only(model.to(device).eval(), args.batch_size, 20 if cuda else 3, args.compile, device)

    print(
        json.dumps(
            {
                "benchmark": "embed",
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "model": f"vit-{size} 96^3 patch 12, 4 registers",
                "precision": "bf16" if cuda else "fp32",
                "compile": args.compile,
                "batch": args.batch_size,
                "workers": args.workers,
                "scans": args.scans,
                "store_volume": f"128^3 int16 in {DEFAULT_CODEC}, warm page cache",
                "end_to_end_s": round(t_full, 2),
                "end_to_end_scans_per_s": round(args.scans / t_full, 1),
                "steady_scans_per_s": round((args.scans - quarter) / max(t_full - t_quarter, 1e-9), 1),
                "forward_only_volumes_per_s": round(forward_rate, 1),
                "cpu_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
