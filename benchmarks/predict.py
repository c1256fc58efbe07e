"""Prediction throughput: scans/s of `fmct predict` on DICOM series (discovery, reading, canonical grid in
memory, the detector), next to the two-step path it replaces, measured in the same run on the same
scans: `fmct ingest` into a store, then the same detector on the stored volumes (both warmed up on one
scan first; each timing includes its fixed costs: model load, reader processes). And the cost of
`--saliency` (Integrated Gradients, 16 steps, NIfTI + PNG per scan and finding).

The detector is a ViT-tiny of the shipped checkpoint's geometry (48^3 input, patch 8, width 128, 4
blocks; weights drawn at random: speed does not depend on them) with a linear head of two findings,
on the demo's grid (64^3 voxels of 3 mm). The series are head phantoms of ``--matrix``^2 x ``--slices``
slices (0.5 mm pixels, 2.5 mm slices). Prints one JSON line.

    python benchmarks/predict.py [--scans 8] [--matrix 256] [--slices 64] [--workers 2] [--out /tmp/fmct-bench-predict]
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

from fmct import detector as detectors
from fmct import hub
from fmct.config import CanonicalConfig, IngestConfig, SelectionConfig, to_dict
from fmct.data import StoreVolumes
from fmct.data.batches import read_hu_batches
from fmct.fingerprint import file_sha256
from fmct.ingest import ingest
from fmct.io import write_series
from fmct.models import ViT3DConfig
from fmct.models.classifier import Classifier
from fmct.models.windows import DEFAULT_WINDOWS
from fmct.predict import PredictConfig, predict

GRID = CanonicalConfig(spacing_mm=3.0, shape=(64, 64, 64))
FINDINGS = ["ich", "fracture"]


def write_phantoms(folder: Path, n: int, matrix: int, slices: int) -> list[Path]:
    """``n`` DICOM series of an ellipsoidal head (skull 1100 HU, brain 33 HU, noise 6 HU, a bright lesion)."""
    rng = np.random.default_rng(0)
    pixel, thickness = 240.0 / matrix, 2.5
    affine = np.diag([-pixel, -pixel, thickness, 1.0])
    affine[:3, 3] = [120.0, 120.0, -80.0]
    x, y, z = np.meshgrid(
        (np.arange(matrix) - matrix / 2) * pixel,
        (np.arange(matrix) - matrix / 2) * pixel,
        (np.arange(slices) - slices / 2) * thickness,
        indexing="ij",
        sparse=True,
    )
    radius = np.sqrt((x / 72) ** 2 + (y / 88) ** 2 + (z / 78) ** 2)
    paths = []
    for i in range(n):
        hu = np.where(radius < 1.0, 1100.0, -1000.0).astype(np.float32)
        hu[np.broadcast_to(radius < 0.92, hu.shape)] = 33.0
        centre = rng.uniform(-30, 30, size=3)
        hu[np.broadcast_to((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < 100.0, hu.shape)] = 75.0
        hu += rng.normal(0, 6, size=hu.shape).astype(np.float32)
        write_series(folder / f"case{i:03d}", hu, affine, tags={"PatientID": f"P{i}", "Modality": "CT"})
        paths.append(folder / f"case{i:03d}")
    return paths


def write_detector(folder: Path) -> Path:
    """A finetune-kind detector folder of a random ViT-tiny with a linear head (thresholds at probability 0.5,
    Platt 1, 0; not validated, so predict warns)."""
    torch.manual_seed(0)
    backbone = hub.random_init(
        ViT3DConfig(
            size="tiny",
            img_size=(48, 48, 48),
            patch_size=(8, 8, 8),
            embed_dim=128,
            depth=4,
            n_heads=4,
            n_registers=1,
            layerscale_init=None,
        ),
        seed=0,
    )
    classifier = Classifier(backbone, len(FINDINGS)).eval()
    hub.save(backbone, folder / detectors.BACKBONE_DIR, extra={"windows": [list(w) for w in DEFAULT_WINDOWS]})
    point = {  # thresholds on the probability (fmct.eval.calibration)
        "specificity_target": 0.9,
        "threshold": 0.5,
        "score_threshold": 0.0,
        "val_sensitivity": 0.5,
        "val_specificity": 0.9,
    }
    per_finding = {
        f: {
            "calibration": {"method": "platt", "a": 1.0, "b": 0.0},
            "operating_points": {"spec90": point, "spec95": point},
            "validation": {
                "n_pos": 1,
                "n_neg": 1,
                "auroc": 0.5,
                "validated": False,
                "reason": "a benchmark's random head",
            },
        }
        for f in FINDINGS
    }
    config = {
        "kind": "finetune",
        "head": "linear",
        "feature": "",
        "scorer_outputs": FINDINGS,
        "findings": FINDINGS,
        "backbone": {
            "path": detectors.BACKBONE_DIR,
            "name": "bench",
            "shipped": False,
            "sha256": file_sha256(folder / detectors.BACKBONE_DIR / hub.WEIGHTS_FILE),
        },
        "windows_hu": [list(w) for w in DEFAULT_WINDOWS],
        "input_size": [48, 48, 48],
        "canonical": to_dict(GRID),
        "selection": to_dict(SelectionConfig()),
        "grid_source": "benchmark",
        "per_finding": per_finding,
        "left_out": {},
        "provenance": {
            "verb": "benchmark",
            "labels": {"spec": "none", "sha256": ""},
            "store": "",
            "scans_per_split": {},
            "ood_sites": [],
            "seed": 0,
            "budget": {"label_fraction": 1.0, "shots": None},
            "n_train": {f: {"pos": 0, "neg": 0} for f in FINDINGS},
            "metrics": {},
            "recipe": {},
        },
    }
    head = {k: v for k, v in classifier.state_dict().items() if not k.startswith("backbone.")}
    return detectors.write_detector(folder, config, head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fmct-bench-predict"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    series = write_phantoms(args.out / "dicom", args.scans, args.matrix, args.slices)
    folder = write_detector(args.out / "detector")
    config = PredictConfig(batch_size=args.batch_size, workers=args.workers)
    key = args.out / "pseudonym.key"  # the benchmark's own key, never the user's
    # Warm-up of both paths on one scan (lazy imports, first allocations), so neither pays them in the timing.
    predict(folder, series[:1], args.out / "warm-predict", config, key_file=key, progress=False)
    ingest(series[:1], args.out / "warm-store", IngestConfig(canonical=GRID), progress=False, key_file=key)

    started = time.perf_counter()
    predict(folder, series, args.out / "predict", config, key_file=key, progress=False)
    predict_s = time.perf_counter() - started

    # The reference: ingest into a store, then the same detector over the stored volumes.
    started = time.perf_counter()
    ingest(series, args.out / "store", IngestConfig(canonical=GRID), workers=args.workers, progress=False, key_file=key)
    ingest_s = time.perf_counter() - started
    detector = detectors.load_detector(folder)
    volumes = StoreVolumes(args.out / "store")
    started = time.perf_counter()
    batches = [list(range(s, min(s + args.batch_size, len(volumes)))) for s in range(0, len(volumes), args.batch_size)]
    with torch.no_grad():
        for batch in read_hu_batches(volumes, batches, args.workers):
            detector(batch.hu)
    score_s = time.perf_counter() - started

    n_saliency = min(2, args.scans)
    started = time.perf_counter()
    predict(
        folder,
        series[:n_saliency],
        args.out / "saliency",
        PredictConfig(batch_size=args.batch_size, workers=args.workers, saliency=True),
        key_file=key,
        progress=False,
    )
    saliency_s = (time.perf_counter() - started) / n_saliency  # per scan, model load included

    print(
        json.dumps(
            {
                "benchmark": "predict",
                "scans": args.scans,
                "series": f"{args.matrix}x{args.matrix}x{args.slices}",
                "grid": list(GRID.shape),
                "model": "ViT-tiny 48^3 p8 w128 d4",
                "findings": len(FINDINGS),
                "predict_scans_per_s": round(args.scans / predict_s, 3),
                "reference_ingest_then_score_scans_per_s": round(args.scans / (ingest_s + score_s), 3),
                "reference_ingest_s": round(ingest_s, 2),
                "reference_score_s": round(score_s, 2),
                "predict_with_saliency_s_per_scan": round(saliency_s, 2),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
            }
        )
    )


if __name__ == "__main__":
    main()
