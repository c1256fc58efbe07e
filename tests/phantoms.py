"""Phantoms with known world geometry, shared by the preprocessing, ingest and benchmark tests."""

from pathlib import Path

import numpy as np

from fmct.io.dicom_write import write_series
from fmct.io.volume import Volume

HEAD_CENTRE = np.array([8.0, -15.0, 20.0])  # world RAS mm
HEAD_RADII = np.array([70.0, 85.0, 75.0])
BEADS = np.array([[20.0, -10.0, 50.0], [-30.0, 25.0, -10.0], [45.0, -40.0, 10.0]])


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def phantom(axes: np.ndarray, spacing: np.ndarray, shape, shear: float = 0.0, table: bool = False) -> Volume:
    """A soft-tissue ellipsoid head with Gaussian beads (peak 1000 HU above tissue) at known world points.

    ``axes`` columns are the unit directions of i, j, k; ``shear`` tilts the slice stack: the k step gains a
    component of ``shear`` times its length along j (a gantry tilt of atan(shear)).
    """
    columns = axes * spacing
    columns[:, 2] = columns[:, 2] + shear * spacing[2] * axes[:, 1]
    affine = np.eye(4)
    affine[:3, :3] = columns
    centre_index = (np.array(shape) - 1) / 2
    affine[:3, 3] = HEAD_CENTRE - columns @ centre_index
    volume = Volume(hu=np.zeros(shape, np.float32), affine=affine)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = grid @ columns.T + affine[:3, 3]
    inside = (((world - HEAD_CENTRE) / HEAD_RADII) ** 2).sum(-1) < 1
    hu = np.where(inside, 40.0, -1000.0)
    for bead in BEADS:
        hu += 1000.0 * np.exp(-((world - bead) ** 2).sum(-1) / (2 * 3.0**2))
    if table:  # a dense plate 10 mm below the back of the head, longer than the head
        y = world[..., 1]
        hu = np.where((y < HEAD_CENTRE[1] - HEAD_RADII[1] - 10) & (y > HEAD_CENTRE[1] - HEAD_RADII[1] - 16), 300.0, hu)
    volume.hu = hu.astype(np.float32)
    return volume


def bead_positions(volume: Volume) -> np.ndarray:
    """Intensity-weighted centroids (world mm) of the beads, each within 8 mm of its true place."""
    hu = volume.hu.astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
    world = grid @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    found = []
    for bead in BEADS:
        near = (((world - bead) ** 2).sum(-1) < 8.0**2) & (hu > 140)
        weight = hu[near] - 40.0
        found.append((world[near] * weight[:, None]).sum(0) / weight.sum())
    return np.array(found)


def small_head(axes=np.eye(3), shear=0.0, spacing=(4.0, 4.0, 6.0), shape=(56, 56, 32)) -> Volume:
    """A coarse head phantom covering 224 x 224 x 192 mm, quick to write and read (whole HU)."""
    volume = phantom(np.asarray(axes, float), np.asarray(spacing), shape, shear)
    volume.hu = np.rint(volume.hu)
    return volume


def write_head(folder: Path, volume: Volume | None = None, **tags) -> list[Path]:
    """Write ``volume`` (default :func:`small_head`) as a DICOM series in ``folder`` with DICOM ``tags``."""
    volume = volume or small_head()
    return write_series(folder, volume.hu, volume.affine, tags=tags)
