"""The one in-memory form of a scan that every reader returns and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        hu: HU values, shape (I, J, K), float32 or int16. Axis order follows NIfTI/nibabel: for a DICOM
            series, I runs along a row (column index), J down the columns (row index), K across slices.
        affine: 4x4 float64 matrix mapping voxel indices (i, j, k, 1) to world coordinates in mm in the
            RAS+ frame of NIfTI and nibabel: +x towards the patient's Right, +y Anterior, +z Superior.
            (DICOM's patient frame is LPS+; the DICOM reader negates x and y.) Its columns need not be
            orthogonal: a gantry-tilted series has a sheared affine, corrected when resampled.
        metadata: safe acquisition facts only (kernel, kvp, manufacturer, model, slice_thickness_mm,
            pixel_spacing_mm, original shape, ...) and ``notes``: what the reader set aside to keep the
            scan (a localizer, frames in another orientation, an unreadable copy of a slice). Never
            names, IDs, dates, UIDs or paths.
        identity: raw identifiers (patient_id, study_uid, series_uid) used by ingest to derive keyed
            pseudonyms. They never leave ingest: nothing writes this field anywhere.
        source: the path the scan was read from (a file or a series folder).

    """

    hu: np.ndarray
    affine: np.ndarray
    metadata: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)
    source: str = ""

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along (I, J, K) in mm: the lengths of the affine's first three columns."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """World RAS coordinates (mm) of voxel indices ``ijk`` of shape (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of world RAS points ``xyz`` (mm) of shape (..., 3)."""
        inverse = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inverse[:3, :3].T + inverse[:3, 3]
