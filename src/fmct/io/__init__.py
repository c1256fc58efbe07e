"""Reading scans into one ``Volume`` (HU array + RAS affine + safe metadata), and writing DICOM series."""

from __future__ import annotations

from pathlib import Path

from fmct.errors import FileScanError, ScanError  # noqa: F401  (the errors every reader raises)
from fmct.io.dicom import SeriesInfo, discover, read_series, select_series
from fmct.io.dicom_write import write_series
from fmct.io.nifti import read_nifti
from fmct.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """True for a path named like a NIfTI file (.nii or .nii.gz)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_scan(path: str | Path) -> Volume:
    """Read one scan: a .nii/.nii.gz file, a folder holding exactly one DICOM series, or a DICOM file.

    Returns HU (I, J, K; int16 or float32) with its RAS voxel -> world (mm) affine. Raises ScanError with a
    one-line reason (for a folder with several series, naming how many).
    """
    return read_nifti(path) if is_nifti(path) else read_series(path)


__all__ = [
    "Volume",
    "ScanError",
    "FileScanError",
    "read_scan",
    "read_series",
    "read_nifti",
    "discover",
    "select_series",
    "SeriesInfo",
    "write_series",
    "is_nifti",
]
