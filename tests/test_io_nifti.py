"""NIfTI reading: sform/qform, scaling, dimensionality, bad files; agreement with dcm2niix + DICOM reader."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmct.io import ScanError, read_nifti, read_scan, read_series, write_series

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


def _save(
    path: Path, data: np.ndarray, affine: np.ndarray, *, sform_code: int = 1, qform: np.ndarray | None = None
) -> Path:
    image = nib.Nifti1Image(data, None)  # no image affine: nibabel would overwrite both forms with it on save
    image.header.set_sform(affine, code=sform_code)
    image.header.set_qform(affine if qform is None else qform, code=1)
    nib.save(image, path)
    return path


def _oblique_affine() -> np.ndarray:
    angle = np.radians(20)
    affine = np.eye(4)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine[:3, :3] = rotation @ np.diag([0.5, 0.6, 2.0])
    affine[:3, 3] = [-60.0, -80.0, -30.0]
    return affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_reads_hu_and_sform(tmp_path, head_phantom, suffix):
    hu = head_phantom((40, 36, 12))
    path = _save(tmp_path / f"head{suffix}", hu, _oblique_affine(), qform=np.diag([2.0, 2.0, 2.0, 1.0]))  # sform wins
    volume = read_nifti(path)
    assert volume.hu.dtype == np.float32 and volume.hu.shape == (40, 36, 12)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine, _oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(volume.metadata["original_spacing_mm"], [0.5, 0.6, 2.0], atol=1e-5)
    assert volume.metadata["original_shape"] == [40, 36, 12]
    assert volume.identity["series_uid"] == str(path.resolve()) and volume.source == str(path)
    np.testing.assert_array_equal(read_scan(path).hu, hu)  # read_scan dispatches on the suffix


def test_qform_is_used_when_sform_code_is_zero(tmp_path, head_phantom):
    qform = np.diag([-1.0, 1.0, 3.0, 1.0])
    qform[:3, 3] = [90.0, -100.0, -40.0]
    path = _save(tmp_path / "q.nii", head_phantom((16, 16, 4)), _oblique_affine(), sform_code=0, qform=qform)
    np.testing.assert_allclose(read_nifti(path).affine, qform, atol=1e-5)


def test_scl_slope_and_inter_are_applied(tmp_path):
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(2.0, -1000.0)
    nib.save(image, tmp_path / "scaled.nii")
    np.testing.assert_array_equal(read_nifti(tmp_path / "scaled.nii").hu, 2.0 * stored - 1000.0)


def test_values_below_air_become_air(tmp_path, head_phantom):
    hu = head_phantom((16, 16, 4))
    hu[:3, :3, :] = -3024  # outside the reconstruction circle, as exported by many converters
    volume = read_nifti(_save(tmp_path / "fov.nii", hu, np.eye(4)))
    assert volume.hu.min() == -1024 and (volume.hu[:3, :3, :] == -1024).all()


def test_4d_with_one_volume_is_squeezed_and_true_4d_rejected(tmp_path, head_phantom):
    hu = head_phantom((16, 16, 4))
    assert read_nifti(_save(tmp_path / "one.nii", hu[..., None], np.eye(4))).hu.shape == (16, 16, 4)
    with pytest.raises(
        ScanError, match=r"^four\.nii: 4D image \(shape \(16, 16, 4, 3\)\), only 3D volumes are supported$"
    ):
        read_nifti(_save(tmp_path / "four.nii", np.stack([hu] * 3, axis=-1), np.eye(4)))
    with pytest.raises(ScanError, match=r"^flat\.nii: 2D image"):
        read_nifti(_save(tmp_path / "flat.nii", hu[:, :, 0], np.eye(4)))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels_are_rejected(tmp_path, bad_value):
    data = np.zeros((8, 8, 4), dtype=np.float32)
    data[2, 3, 1] = bad_value
    data[5, 5, 2] = bad_value
    with pytest.raises(ScanError, match=r"^bad\.nii: 2 NaN/inf voxels$"):
        read_nifti(_save(tmp_path / "bad.nii", data, np.eye(4)))


def test_unreadable_and_truncated_files(tmp_path, head_phantom):
    good = _save(tmp_path / "good.nii.gz", head_phantom((32, 32, 8)), np.eye(4))
    truncated_gz = tmp_path / "cut.nii.gz"
    truncated_gz.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ScanError, match=r"^cut\.nii\.gz: unreadable NIfTI"):
        read_nifti(truncated_gz)
    plain = tmp_path / "cut.nii"
    plain.write_bytes(gzip.decompress(good.read_bytes())[:2000])
    with pytest.raises(ScanError, match=r"^cut\.nii: unreadable NIfTI"):
        read_nifti(plain)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"this is not an image" * 30)
    with pytest.raises(ScanError, match=r"^garbage\.nii: unreadable NIfTI \("):
        read_nifti(garbage)
    with pytest.raises(ScanError, match=r"missing\.nii: no such file$"):
        read_nifti(tmp_path / "missing.nii")


@pytest.mark.parametrize("rotation_deg", [0.0, 20.0])
def test_dcm2niix_output_matches_the_dicom_reader(tmp_path, head_phantom, ras_affine, rotation_deg):
    """The same series through dcm2niix + read_nifti and through read_series: same HU, same world."""
    hu = head_phantom((40, 36, 12))
    affine = ras_affine(rotation_x_deg=rotation_deg)
    write_series(tmp_path / "dcm", hu, affine, rescale=(1.0, 0.0), file_names="shuffled")
    (tmp_path / "nii").mkdir()
    command = [str(DCM2NIIX), "-z", "y", "-f", "vol", "-o", str(tmp_path / "nii"), str(tmp_path / "dcm")]
    subprocess.run(command, check=True, capture_output=True)
    from_nifti = read_nifti(tmp_path / "nii" / "vol.nii.gz")
    from_dicom = read_series(tmp_path / "dcm")
    # dcm2niix may flip axes: compare through world coordinates of every voxel index triple
    to_dicom_voxels = np.linalg.inv(from_dicom.affine) @ from_nifti.affine
    permutation = np.abs(np.round(to_dicom_voxels[:3, :3])).argmax(axis=0)
    np.testing.assert_allclose(np.abs(to_dicom_voxels[:3, :3]), np.eye(3)[:, permutation], atol=1e-3)
    ijk = np.argwhere(np.ones(from_nifti.hu.shape, dtype=bool))
    mapped = np.rint(nib.affines.apply_affine(to_dicom_voxels, ijk)).astype(int)
    np.testing.assert_allclose(nib.affines.apply_affine(to_dicom_voxels, ijk), mapped, atol=1e-3)
    np.testing.assert_array_equal(from_nifti.hu[tuple(ijk.T)], from_dicom.hu[tuple(mapped.T)])
