"""How visible is a bleed on a store's grid? AUROCs of hand-made density counts, with no model and no fit.

For each labelled scan of a store: the number of voxels denser than the brain by more than 15, 20, 25 and
30 HU (and below 110 HU, above which is bone or metal) inside the skull and at least two voxels from bone,
and the same count over the whole volume. The skull is the voxels above 200 HU, closed twice; "inside" is
each axial slice's filled hole. A count is a score: its AUROC against the finding says how far density
alone, read by hand, separates the scans, which is a reference for what a model trained on a few dozen
labels can be expected to reach on that grid.

Usage: python benchmarks/ich_visibility.py --store STORE --labels LABELS.csv [--finding ich]
       [--split test] [--sites A,B]
Prints one JSON line: the scans and positives counted, and each count's AUROC.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage

from fmct.eval.cohort import CohortConfig, load_cohort
from fmct.eval.metrics import auroc
from fmct.store import Store

BONE_HU = 200.0
CEILING_HU = 110.0
MARGINS_HU = (15, 20, 25, 30)


def density_counts(hu: np.ndarray) -> dict[str, int]:
    """Voxel counts of one canonical volume ``hu`` (X, Y, Z) HU, axial slices along Z."""
    bone = hu > BONE_HU
    closed = ndimage.binary_closing(bone, iterations=2)
    inside = np.stack([ndimage.binary_fill_holes(closed[:, :, k]) for k in range(hu.shape[2])], axis=2) & ~closed
    brain = inside & ~ndimage.binary_dilation(bone, iterations=2)
    soft = brain & (hu > 0) & (hu < 80)
    brain_hu = float(np.median(hu[soft])) if soft.any() else 35.0
    counts = {"whole_volume_52_to_110": int(((hu > 52) & (hu < CEILING_HU)).sum())}
    for margin in MARGINS_HU:
        counts[f"brain_plus_{margin}"] = int(((hu > brain_hu + margin) & (hu < CEILING_HU) & brain).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--finding", default="ich")
    parser.add_argument("--split", default="", help="only the scans of this split (the labels' split column)")
    parser.add_argument("--sites", default="", help="only the scans of these sites, comma-separated")
    args = parser.parse_args()
    store = Store(args.store)
    config = CohortConfig(findings=(args.finding,), use_split_column=True)
    cohort = load_cohort(args.labels, store.scan_ids, args.store, config, args.store)
    chosen = ~np.isnan(cohort.labels[:, 0])
    if args.split:
        chosen &= cohort.split == args.split
    if args.sites:
        chosen &= np.isin(cohort.sites, args.sites.split(","))
    rows = np.flatnonzero(chosen)
    labels = cohort.labels[rows, 0]
    counts = [density_counts(store.read(cohort.scan_ids[i]).astype(np.float32)) for i in rows]
    result = {
        "store": store.path.name,
        "finding": args.finding,
        "split": args.split or "all",
        "sites": args.sites or "all",
    }
    result.update(scans=len(rows), positives=int(labels.sum()))
    result.update({name: round(float(auroc(labels, np.array([c[name] for c in counts]))), 3) for name in counts[0]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
