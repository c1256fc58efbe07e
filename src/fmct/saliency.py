"""Where a detector's evidence for a finding lies in a scan: Integrated Gradients, mapped back onto the
source scan's own grid, and a PNG overlay through the peak.

Method: Integrated Gradients (Sundararajan et al. 2017) of each finding's logit with respect to the
model input (the windowed canonical volume), from a black baseline (every window at its floor), with
``steps`` midpoint-rule steps along the straight path, summed over the HU-window channels. It is
faithful in the sense that matters here: by its completeness property the attributions add up to the
logit's difference between the scan and the baseline (the test checks it), so the map shows what moved
the detector's own output, per finding and at voxel resolution, for any head and backbone, in
``steps`` forward and backward passes. Not chosen: attention rollout (one map for every finding of a
CLS head, and attention is not attribution), and occlusion with the ViT's mask token (out of
distribution for a model never trained with it: on a detector fine-tuned from scratch its peak sat on
the same edge patch for every scan, inside none of 16 planted bleeds; and patch-coarse). The map is
smoothed with a Gaussian of ``sigma_mm`` (``fmct predict``: 8 mm) on the canonical grid: raw voxel
attributions carry the patch embedding's checkerboard and thin rims at edges (skull, field of view),
and a bleed is a region, not a voxel: unsmoothed, the peak fell in 4 of 16 planted bleeds (3 mm: 13,
4.5 mm: 15); at 8 mm in all 16, and 7 mm from the centre of a 15 mm bleed on an unseen oblique DICOM series.

Grids: the attribution lives on the model input, which is the canonical volume resized whole, so it is
interpolated onto the canonical grid (align_corners=False, the resize's own sampling) and from there
resampled into the source scan's grid with both affines (:func:`fmct.preprocess.sample_on_grid`), where
it overlays the original series in 3D Slicer or ITK-SNAP. Units: logit per voxel (after smoothing).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fmct.atomic import atomic_write_bytes
from fmct.detector import Detector, load_detector, resolve_detector
from fmct.devices import autocast, default_device
from fmct.models.windows import BRAIN_WINDOW, display_range
from fmct.preprocess import sample_on_grid
from fmct.store import Store


def integrated_gradients(detector: Detector, x: torch.Tensor, steps: int = 16, batch_size: int = 16) -> torch.Tensor:
    """Integrated Gradients of one windowed volume ``x`` (1, C, D, H, W) on the detector's device from the
    black baseline: float32 (F, D, H, W), F = the detector's findings, summed over channels; the sum of
    a finding's map approximates score(x) - score(baseline) (midpoint rule with ``steps`` steps).

    Run it under the device's autocast (as the detector's forward is) for the same precision.
    """
    baseline = torch.zeros_like(x)
    alphas = (torch.arange(steps, device=x.device, dtype=torch.float32) + 0.5) / steps
    n_findings = len(detector.findings)
    total = torch.zeros((n_findings, *x.shape[1:]), device=x.device)
    with torch.enable_grad():
        for start in range(0, steps, batch_size):
            alpha = alphas[start : start + batch_size].view(-1, 1, 1, 1, 1)
            path = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
            scores = detector.scores_of_input(path)  # (steps in this chunk, F)
            for f in range(n_findings):
                (gradient,) = torch.autograd.grad(scores[:, f].sum(), path, retain_graph=f < n_findings - 1)
                total[f] += gradient.float().sum(dim=0)
    return (total / steps * (x - baseline)[0]).sum(dim=1)


def on_canonical_grid(
    maps: torch.Tensor, shape: tuple[int, int, int], spacing_mm: float, sigma_mm: float
) -> np.ndarray:
    """Maps (F, D, H, W) on the model input interpolated onto the canonical grid (``shape`` voxels of
    ``spacing_mm``) and smoothed with a Gaussian of ``sigma_mm``: float32 (F, *shape). The model input
    is the canonical volume resized whole, so trilinear with align_corners=False maps voxel to voxel."""
    upsampled = F.interpolate(maps[None].float().cpu(), size=tuple(shape), mode="trilinear", align_corners=False)[
        0
    ].numpy()
    sigma = sigma_mm / spacing_mm
    return np.stack([ndimage.gaussian_filter(m, sigma) if sigma > 0 else m for m in upsampled]).astype(np.float32)


def to_source_grid(
    canonical_map: np.ndarray,
    canonical_affine: np.ndarray,
    source_affine: np.ndarray,
    source_shape: tuple[int, int, int],
) -> np.ndarray:
    """A canonical-grid map (X, Y, Z) resampled into the source scan's grid: float32 ``source_shape``
    (I, J, K) with the source's voxel -> world affine, 0 outside the canonical cube."""
    return sample_on_grid(canonical_map, canonical_affine, source_affine, tuple(source_shape), "linear", fill=0.0)


def peak_voxel(canonical_map: np.ndarray) -> tuple[int, int, int]:
    """The (i, j, k) voxel of a map's maximum, the strongest evidence for the finding (the first on ties)."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(canonical_map)), canonical_map.shape))


def _radiological_planes(volume: np.ndarray, peak: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal planes through ``peak`` of a canonical (RAS: i to the patient's right,
    j anterior, k superior) volume, as radiologists read them: the patient's right on the image's
    left, anterior and superior up, the face to the left on the sagittal plane."""
    i, j, k = peak
    return [
        ("axial", volume[::-1, ::-1, k].T),
        ("coronal", volume[::-1, j, ::-1].T),
        ("sagittal", volume[i, ::-1, ::-1].T),
    ]


def overlay_png(canonical_hu: np.ndarray, canonical_map: np.ndarray, world_mm: np.ndarray, title: str) -> bytes:
    """A PNG (bytes) of the heatmap's positive part (evidence for the finding) over the canonical scan
    (brain window) on the axial, coronal and sagittal planes through the map's peak, which is marked;
    ``world_mm`` is the peak's RAS position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = peak_voxel(canonical_map)
    top = float(canonical_map.max())
    figure, axes = plt.subplots(1, 3, figsize=(9.0, 3.4), facecolor="black")
    marker = {
        "axial": (canonical_hu.shape[0] - 1 - peak[0], canonical_hu.shape[1] - 1 - peak[1]),
        "coronal": (canonical_hu.shape[0] - 1 - peak[0], canonical_hu.shape[2] - 1 - peak[2]),
        "sagittal": (canonical_hu.shape[1] - 1 - peak[1], canonical_hu.shape[2] - 1 - peak[2]),
    }
    for ax, (name, plane), (_, heat) in zip(
        axes, _radiological_planes(canonical_hu, peak), _radiological_planes(canonical_map, peak)
    ):
        ax.imshow(
            plane,
            cmap="gray",
            vmin=display_range(BRAIN_WINDOW)[0],
            vmax=display_range(BRAIN_WINDOW)[1],
            interpolation="bilinear",
        )
        if top > 0:
            ax.imshow(
                np.ma.masked_less_equal(heat, 0.5 * top),
                cmap="hot",
                vmin=0.0,
                vmax=top,
                alpha=0.5,
                interpolation="bilinear",
            )
        ax.plot(*marker[name], marker="+", color="#00ff00", markersize=12, markeredgewidth=1.5)
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    figure.suptitle(
        f"{title}  peak at RAS ({world_mm[0]:.0f}, {world_mm[1]:.0f}, {world_mm[2]:.0f}) mm", color="white", fontsize=9
    )
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, facecolor="black")
    plt.close(figure)
    return buffer.getvalue()


# ------------------------------------------------------------------------- examples beside predictions
EXAMPLE_POINT = "spec90"  # examples are called positive at this operating point, as fmct report shows them


def write_examples(
    out: str | os.PathLike,
    rows: list[dict],
    store_path: str | os.PathLike,
    per_kind: int = 3,
    steps: int = 16,
    sigma_mm: float = 8.0,
    device: str | torch.device | None = None,
) -> int:
    """Saliency PNGs of the test scans a probe or finetune run called positive, for ``fmct report``'s examples:
    with the detector of ``out`` (its seed-0 fit trained on the most labels), per finding and site group
    the ``per_kind`` highest-scoring true positives and false positives at the ``spec90`` threshold set on
    validation, as ``out/saliency/<scan_id>/<finding>.png`` on the store's canonical volume. ``rows`` are the
    run's prediction rows (with ``threshold_spec90``). Returns how many were written."""
    out, device = Path(out), default_device(device)
    detector = load_detector(resolve_detector(out), device)
    budget, seed = detector.config["provenance"]["budget"], detector.config["provenance"]["seed"]
    fraction = "" if budget["label_fraction"] is None else budget["label_fraction"]
    shots = "" if budget["shots"] is None else budget["shots"]
    mine = [
        r
        for r in rows
        if r["seed"] == seed
        and r["label_fraction"] == fraction
        and r["shots"] == shots
        and r["finding"] in detector.findings
        and f"threshold_{EXAMPLE_POINT}" in r
    ]
    chosen = []
    for finding in detector.findings:
        for split in ("test", "ood"):
            for label in (1, 0):  # true positives, then false positives
                called = [
                    r
                    for r in mine
                    if r["finding"] == finding
                    and r["split"] == split
                    and r["label"] == label
                    and r["probability"] >= r[f"threshold_{EXAMPLE_POINT}"]
                ]
                chosen += sorted(called, key=lambda r: -r["score"])[:per_kind]
    store = Store(store_path)
    for row in chosen:
        hu = store.read(row["scan_id"])
        x = detector.model_input(torch.from_numpy(hu[None, None]).to(device))
        with autocast(device):
            attribution = integrated_gradients(detector, x, steps)
        f = detector.findings.index(row["finding"])
        manifest = store.row(row["scan_id"])
        spacing = float(manifest["store_spacing_mm"][0])
        heat = on_canonical_grid(attribution[f : f + 1], hu.shape, spacing, sigma_mm)[0]
        # Store voxel -> source world (mm); a store written by hand may not record it: then store voxels in mm.
        affine = store.affine(row["scan_id"]) if manifest.get("affine") else np.diag([spacing] * 3 + [1.0])
        world = affine[:3, :3] @ np.array(peak_voxel(heat), dtype=np.float64) + affine[:3, 3]
        kind = "true positive" if row["label"] == 1 else "false positive"
        title = f"{row['scan_id']}  {row['finding']}  {kind}  score {row['score']:.2f}"
        atomic_write_bytes(
            out / "saliency" / row["scan_id"] / f"{row['finding']}.png", overlay_png(hu, heat, world, title)
        )
    return len(chosen)
