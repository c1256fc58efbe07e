"""NIfTI CT volumes (.nii, .nii.gz) into a ``Volume``, and volumes written as NIfTI."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from fmct.atomic import atomic_write_bytes
from fmct.errors import FileScanError
from fmct.io.dicom import AIR_HU
from fmct.io.volume import Volume
from fmct.pseudonym import scrubbed_reason

_MAX_DECODED_BYTES = 4 * 2**30  # as for DICOM: a header claiming more is corrupt or hostile


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI-1/2 CT image as HU float32 (I, J, K) with its RAS voxel -> world (mm) affine.

    The affine is the sform when sform_code > 0, else the qform (NIfTI world space is RAS+, as
    ``Volume``'s). scl_slope / scl_inter are applied. A 4D image whose extra axes have length 1 is
    squeezed to 3D; any other 4D image is rejected. Values below -1024 HU become -1024 (air), as in the
    DICOM reader. NIfTI carries no identifiers, so ``identity`` holds the resolved file path only.

    Raises:
        FileScanError: one-line reason for a missing, unreadable or truncated file, a non-3D image, an
            image that would take more than 4 GiB as float32, or NaN/inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileScanError(path, "no such file")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for a corrupt header
        raise FileScanError(path, f"unreadable NIfTI ({scrubbed_reason(error)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise FileScanError(path, f"not a NIfTI image ({type(image).__name__})")
    shape = image.shape
    if len(shape) < 3:
        raise FileScanError(path, f"{len(shape)}D image (shape {shape}), a CT volume needs 3 dimensions")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise FileScanError(path, f"4D image (shape {shape}), only 3D volumes are supported")
    if 4 * int(np.prod(shape)) > _MAX_DECODED_BYTES:
        raise FileScanError(
            path, f"implausible image size {shape}: {4 * int(np.prod(shape)) / 2**30:.1f} GiB as float32"
        )
    header = image.header
    sform, sform_code = header.get_sform(coded=True)
    affine = sform if sform_code and sform_code > 0 else header.get_qform()
    try:
        hu = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape[:3])
    except Exception as error:  # truncated data: EOFError, zlib / gzip errors, short reads
        raise FileScanError(path, f"unreadable NIfTI voxel data ({scrubbed_reason(error)})") from None
    not_finite = int(np.count_nonzero(~np.isfinite(hu)))
    if not_finite:
        raise FileScanError(path, f"{not_finite} NaN/inf voxels")
    np.maximum(hu, AIR_HU, out=hu)
    resolved = str(path.resolve())
    metadata = {
        "kernel": "",
        "kvp": None,
        "manufacturer": "",
        "model": "",
        "slice_thickness_mm": None,
        "original_shape": [int(n) for n in shape[:3]],
        "original_spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
    }
    identity = {"patient_id": resolved, "study_uid": resolved, "series_uid": resolved}
    return Volume(
        hu=hu, affine=np.asarray(affine, dtype=np.float64), metadata=metadata, identity=identity, source=str(path)
    )


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (I, J, K) with its RAS voxel -> world (mm) ``affine`` as a gzipped NIfTI-1, atomically.

    The affine goes to the sform and qform (a tilted series' shear survives in the sform), units mm.
    """
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    atomic_write_bytes(Path(path), gzip.compress(image.to_bytes(), compresslevel=3, mtime=0))
