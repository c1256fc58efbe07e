"""Ingest throughput: fmct ingest (--workers 1 and 2) against the equivalent MONAI pipeline, same files.

Writes a folder of realistic head CT series (512x512, 150-300 slices, a head phantom with skull, brain,
noise and a CT table), then times:
- fmct: `ingest()` into a fresh store (discovery, selection, HU, canonical 128^3 at 1.5 mm, int16 files);
- MONAI: LoadImage(PydicomReader) -> EnsureChannelFirst -> Orientation(RAS) -> Spacing(1.5 mm) ->
  ResizeWithPadOrCrop(128^3), saved as int16 .npy, one series after another in one process.
Both run with one torch thread per process, after a warm-up ingest (imports, page cache). Wall time
and CPU time are both reported: CPU time (user + system, of the process and of the worker processes
it ran, which ingest reads scans in) is the one-core comparison that other load on the machine does
not distort. It checks that both put a bead at the same world point
(geometry) and prints one JSON line of figures.

    python benchmarks/ingest.py [--series 6] [--out /tmp/fmct-bench-ingest]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fmct.config import IngestConfig
from fmct.ingest import ingest
from fmct.io.dicom_write import write_series
from fmct.store import Store

BEAD_WORLD = np.array([12.0, -20.0, 35.0])  # RAS mm


def head_phantom(n_slices: int, slice_mm: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) HU of a skull-and-brain ellipsoid on a table, and its RAS affine (0.45 mm pixels)."""
    pixel_mm = 0.45
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    affine[:3, 3] = [-pixel_mm * 255.5, -pixel_mm * 255.5, -slice_mm * n_slices / 2]
    x = (np.arange(512) - 255.5) * pixel_mm
    z = affine[2, 3] + np.arange(n_slices) * slice_mm
    X, Y, Z = np.meshgrid(x, x, z, indexing="ij", sparse=True)
    r = np.sqrt((X / 72) ** 2 + ((Y + 5) / 90) ** 2 + ((Z - 10) / 80) ** 2)
    hu = np.full((512, 512, n_slices), -1000.0, np.float32)
    hu[np.broadcast_to(r < 1.08, hu.shape)] = 30  # scalp
    hu[np.broadcast_to(r < 1.0, hu.shape)] = 1200  # skull
    hu[np.broadcast_to(r < 0.93, hu.shape)] = 35  # brain
    hu[:, 60:75, :] = 250  # table plate behind the head
    bead = ((X - BEAD_WORLD[0]) ** 2 + (Y - BEAD_WORLD[1]) ** 2 + (Z - BEAD_WORLD[2]) ** 2) < 4.0**2
    hu[bead] = 2000
    hu += rng.normal(0, 8, size=hu.shape).astype(np.float32)
    return hu, affine


def write_cohort(root: Path, n_series: int) -> int:
    rng = np.random.default_rng(0)
    n_files = 0
    for index in range(n_series):
        n_slices = int(rng.integers(150, 301))
        hu, affine = head_phantom(n_slices, 0.625 if n_slices > 220 else 1.0, rng)
        files = write_series(root / f"series{index:02d}", hu, affine, tags={"PatientID": f"BENCH{index}"})
        n_files += len(files)
    return n_files


def cpu_seconds() -> np.ndarray:
    """(this process, its finished child processes: ingest's workers) user + system CPU seconds."""
    usages = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([usage.ru_utime + usage.ru_stime for usage in usages])


def run_fmct(root: Path, store: Path, workers: int) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """(wall seconds, CPU seconds of (this process, its workers), bead world positions) for one ingest."""
    shutil.rmtree(store, ignore_errors=True)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    summary = ingest([root], store, IngestConfig(), workers=workers, progress=False)
    seconds, cpu_used = time.perf_counter() - started, cpu_seconds() - cpu_started
    assert summary.stored > 0 and summary.skipped == 0, summary.describe()
    loaded = Store(store)
    return seconds, cpu_used, [bead_world(np.asarray(hu), loaded.affine(i)) for i, (hu, _) in enumerate(loaded)]


def run_monai(root: Path, out: Path) -> tuple[float, float, list[np.ndarray]]:
    from monai.data import PydicomReader
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ResizeWithPadOrCrop, Spacing

    pipeline = Compose(
        [
            LoadImage(reader=PydicomReader(), image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
            ResizeWithPadOrCrop(spatial_size=(128, 128, 128), constant_values=-1024),
        ]
    )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    beads = []
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = pipeline(str(folder))
        hu = image[0].numpy().round().astype(np.int16)
        np.save(out / f"{folder.name}.npy", hu)
        beads.append(bead_world(hu, image.affine.numpy()))
    return time.perf_counter() - started, float(sum(cpu_seconds() - cpu_started)), beads


def bead_world(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    points = np.argwhere(hu > 1500)
    return points.mean(0) @ affine[:3, :3].T + affine[:3, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fmct-bench-ingest"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # BLAS/OpenMP pools too, for both contenders: one core each
    root = args.out / "dicom"
    if not root.exists() or len(list(root.iterdir())) != args.series:
        shutil.rmtree(root, ignore_errors=True)
        write_cohort(root, args.series)
    n_files = sum(1 for _ in root.rglob("*.dcm"))
    run_fmct(root, args.out / "warmup", workers=1)  # imports and the page cache, for both contenders
    fmct_1, fmct_1_cpu, fmct_beads = run_fmct(root, args.out / "store1", workers=1)
    fmct_2, _, _ = run_fmct(root, args.out / "store2", workers=2)
    monai_seconds, monai_cpu, monai_beads = run_monai(root, args.out / "monai")
    geometry_mm = float(np.max(np.linalg.norm(np.array(fmct_beads) - np.array(monai_beads), axis=1)))
    truth_mm = float(np.max(np.linalg.norm(np.array(fmct_beads) - BEAD_WORLD, axis=1)))
    n = args.series
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "series": n,
                "dicom_files": n_files,
                "fmct_workers1_scans_per_s": round(n / fmct_1, 3),
                "fmct_workers2_scans_per_s": round(n / fmct_2, 3),
                "monai_scans_per_s": round(n / monai_seconds, 3),
                "ratio_workers1_vs_monai": round(monai_seconds / fmct_1, 2),
                # CPU seconds per scan, workers included: the one-core comparison, robust to other load
                "fmct_workers1_cpu_s_per_scan": round(sum(fmct_1_cpu) / n, 3),
                # of which discovery and selection (the main process) and reading + writing (the worker)
                "fmct_discovery_cpu_s_per_scan": round(fmct_1_cpu[0] / n, 3),
                "fmct_worker_cpu_s_per_scan": round(fmct_1_cpu[1] / n, 3),
                "monai_cpu_s_per_scan": round(monai_cpu / n, 3),
                "ratio_cpu_workers1_vs_monai": round(monai_cpu / sum(fmct_1_cpu), 2),
                "bead_fmct_vs_monai_mm": round(geometry_mm, 3),
                "bead_fmct_vs_truth_mm": round(truth_mm, 3),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
            }
        )
    )


if __name__ == "__main__":
    main()
