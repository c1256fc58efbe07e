"""Shared fixtures: small head phantoms, affines with known geometry, and series built from real slices."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


@pytest.fixture(scope="session", autouse=True)
def pseudonym_key_file(tmp_path_factory) -> Path:
    """One pseudonym key for the whole test session, in a temporary folder (never the user's own key in
    ~/.config/fmct): ``FMCT_KEY_FILE`` points there, for subprocesses too.

    The key is fixed, not random: splits by patient order patients by their keyed pseudonyms, so under a
    new random key each run drew other splits, and a figure measured on a split (a probe's test AUROC)
    changed from run to run."""
    path = tmp_path_factory.mktemp("fmct-key") / "pseudonym.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write("5eed" * 16 + "\n")  # 32 bytes, the key's length
    previous = os.environ.get("FMCT_KEY_FILE")
    os.environ["FMCT_KEY_FILE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FMCT_KEY_FILE", None)
    else:
        os.environ["FMCT_KEY_FILE"] = previous


def _head_phantom(shape: tuple[int, int, int] = (64, 64, 24)) -> np.ndarray:
    """int16 HU (I, J, K): air -1000, scalp 40, skull 1200, brain 35, two ventricles 8, in an ellipsoid."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(grid[0] ** 2 / 0.8**2 + grid[1] ** 2 / 0.9**2 + grid[2] ** 2 / 1.1**2)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[radius < 0.95] = 40
    hu[radius < 0.88] = 1200
    hu[radius < 0.78] = 35
    for side in (-0.15, 0.15):
        ventricle = (grid[0] - side) ** 2 / 0.08**2 + grid[1] ** 2 / 0.3**2 + grid[2] ** 2 / 0.4**2 < 1
        hu[ventricle] = 8
    return hu


def _ras_affine(
    spacing_mm=(0.8, 0.8, 2.0), rotation_x_deg: float = 0.0, tilt_deg: float = 0.0, origin_mm=(25.0, 20.0, -10.0)
) -> np.ndarray:
    """RAS voxel -> world affine of a radiological axial stack (i towards Left, j towards Posterior).

    ``rotation_x_deg`` rotates the whole stack about the L-R axis (an oblique acquisition);
    ``tilt_deg`` shears the slice axis towards Anterior (a gantry tilt): the slices stay parallel.
    """
    angle = np.radians(rotation_x_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    columns = np.diag([-spacing_mm[0], -spacing_mm[1], spacing_mm[2]]).astype(np.float64)
    columns[1, 2] = spacing_mm[2] * np.tan(np.radians(tilt_deg))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ columns
    affine[:3, 3] = origin_mm
    return affine


@pytest.fixture
def head_phantom():
    """Factory ``(shape=(64, 64, 24)) -> int16 HU (I, J, K)`` of a small ellipsoidal head."""
    return _head_phantom


@pytest.fixture
def ras_affine():
    """Factory ``(spacing_mm, rotation_x_deg, tilt_deg, origin_mm) -> 4x4 RAS affine`` (see ``_ras_affine``)."""
    return _ras_affine


@pytest.fixture
def real_slice_series(tmp_path: Path):
    """Factory ``(test file name, n_slices, spacing_mm, tags) -> folder`` of copies of a real slice.

    The slice (from pydicom / pydicom-data) is repeated along its own slice normal with new UIDs, keeping
    its pixel data (and transfer syntax) untouched; ``tags`` (keyword -> value) are set on every copy.
    """

    def build(name: str, n_slices: int = 4, spacing_mm: float = 5.0, tags: dict | None = None) -> Path:
        original = pydicom.dcmread(get_testdata_file(name))
        for keyword, value in (tags or {}).items():
            setattr(original, keyword, value)
        orientation = np.array([float(v) for v in original.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        first_position = np.array([float(v) for v in original.ImagePositionPatient])
        folder = tmp_path / Path(name).stem
        folder.mkdir()
        series_uid = generate_uid()
        for k in range(n_slices):
            ds = copy.deepcopy(original)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in first_position + k * spacing_mm * normal]
            ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
        return folder

    return build
