"""A PNG montage of one synthetic scan: axial, coronal and sagittal planes at brain and bone windows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fmct.atomic import atomic_write_bytes
from fmct.models.windows import BONE_WINDOW, BRAIN_WINDOW, display_range
from fmct.synth.pathology import BITS, FINDINGS
from fmct.synth.subject import SyntheticScan

OUTLINED = [f for f in FINDINGS if f not in ("ich", "midline_shift")]
COLOURS = dict(
    zip(
        OUTLINED,
        ["#ff3030", "#ffa500", "#ffff00", "#00e0ff", "#ff00ff", "#a0ff40", "#4080ff", "#c080ff", "#ff8080", "#00ffa0"],
    )
)
ON_BONE_WINDOW = ("fracture",)  # outlined on the bone window too, where it is seen


def _planes(scan: SyntheticScan) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(title, HU plane, bits plane, aspect) for the axial, coronal and sagittal views through the findings.

    Planes cut through the centre of the outlined findings' voxels, or the middle of the head for a
    normal scan. Images are oriented as radiologists read them: anterior and superior up, the
    patient's right on the left of the image.
    """
    lesion = np.zeros(scan.bits.shape, dtype=bool)
    for finding in OUTLINED:
        lesion |= (scan.bits & BITS[finding]) != 0
    if lesion.any():
        centre = [int(np.median(axis)) for axis in np.nonzero(lesion)]
    else:
        head = scan.hu > 0
        centre = [int(np.median(axis)) for axis in np.nonzero(head[::4, ::4, :])]
        centre = [centre[0] * 4, centre[1] * 4, int(scan.hu.shape[2] * 0.6)]
    i, j, k = centre
    aspect = scan.acquisition.thickness_mm / scan.acquisition.pixel_mm
    return [
        ("axial", scan.hu[:, :, k].T, scan.bits[:, :, k].T, 1.0),
        ("coronal", scan.hu[:, j, ::-1].T, scan.bits[:, j, ::-1].T, aspect),
        ("sagittal", scan.hu[i, :, ::-1].T, scan.bits[i, :, ::-1].T, aspect),
    ]


def preview_png(scan: SyntheticScan, title: str = "") -> bytes:
    """The montage as PNG bytes: brain window on the top row, bone window below, findings outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planes = _planes(scan)
    figure, axes = plt.subplots(2, 3, figsize=(9.0, 6.4), facecolor="black")
    for column, (name, hu, bits, aspect) in enumerate(planes):
        for row, (low, high) in enumerate(display_range(window) for window in (BRAIN_WINDOW, BONE_WINDOW)):
            ax = axes[row, column]
            ax.imshow(hu, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
            for finding in OUTLINED if row == 0 else ON_BONE_WINDOW:
                mask = (bits & BITS[finding]) != 0
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=COLOURS[finding], linewidths=0.7)
            if row == 0:
                ax.set_title(name, color="white", fontsize=9)
            ax.axis("off")
    present = [f for f in FINDINGS if scan.labels.get(f)]
    caption = f"{title}  findings: {', '.join(present) if present else 'none'}"
    if scan.info.get("midline_shift_mm"):
        caption += f"  (midline shift {scan.info['midline_shift_mm']:.1f} mm)"
    figure.suptitle(caption, color="white", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=68, facecolor="black")
    plt.close(figure)
    return buffer.getvalue()


def write_preview(scan: SyntheticScan, path: str | Path, title: str = "") -> Path:
    """Write the montage of ``scan`` to ``path`` (PNG, atomically) and return the path."""
    path = Path(path)
    atomic_write_bytes(path, preview_png(scan, title))
    return path


GALLERY = {  # file stem -> (seed, site, primary findings, severity): the montages shown in the README
    "normal": (3, "B", (), None),
    "iph": (4, "A", ("iph",), 0.6),
    "ivh": (5, "B", ("ivh",), 0.7),
    "sdh": (7, "B", ("sdh",), 0.5),
    "edh": (7, "B", ("edh",), 0.6),
    "sah": (8, "B", ("sah",), 0.8),
    "infarct": (9, "A", ("infarct",), 0.6),
    "hydrocephalus": (10, "B", ("hydrocephalus",), 0.5),
    "atrophy": (11, "C", ("atrophy",), 0.8),
    "mass": (12, "B", ("mass",), 0.6),
    "midline_shift": (13, "B", ("sdh",), 0.95),
    "fracture": (14, "B", ("fracture",), 0.7),
}


def write_gallery(folder: str | Path) -> list[Path]:
    """Write one montage per entry of ``GALLERY`` (a normal scan and one per finding) into ``folder``."""
    from fmct.synth.subject import make_subject

    paths = []
    for stem, (seed, site, findings, severity) in GALLERY.items():
        scan = make_subject(seed, site, findings=findings, severity=severity)
        paths.append(write_preview(scan, Path(folder) / f"{stem}.png", title=f"{stem} (site {site})"))
    return paths
