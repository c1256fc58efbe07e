"""DICOM reading and writing: geometry against independent readers, real CT slices, and bad inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from fmct.config import SelectionConfig
from fmct.io import ScanError, SeriesInfo, discover, read_scan, read_series, select_series, write_series
from fmct.io.dicom import kernel_class

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


# ------------------------------------------------------------------------------ independent readers
def sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK (GDCM) series reader: HU as (I, J, K) and the RAS affine it implies."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    hu = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK arrays are (z, y, x)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine[:2, :] *= -1  # LPS -> RAS
    return hu, affine


def dcm2niix_volumes(folder: Path, out: Path) -> dict[str, nib.Nifti1Image]:
    """Run the dcm2niix CLI; its NIfTI outputs by suffix ('' plain, '_Tilt_1' tilt-corrected, '_Eq_1' equidistant)."""
    out.mkdir()
    subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-f", "vol", "-o", str(out), str(folder)], check=True, capture_output=True
    )
    return {path.stem[3:]: nib.load(path) for path in out.glob("vol*.nii")}


def bright_centroid_world(hu: np.ndarray, affine: np.ndarray, threshold: float = 2000.0) -> np.ndarray:
    """World RAS (mm) of the intensity-weighted centroid of voxels above ``threshold`` HU."""
    weights = np.clip(hu - threshold, 0, None)
    ijk = np.argwhere(weights > 0)
    centroid = (ijk * weights[weights > 0][:, None]).sum(axis=0) / weights.sum()
    return nib.affines.apply_affine(affine, centroid)


def header_world_of_brightest_pixel(folder: Path) -> np.ndarray:
    """World RAS (mm) of the brightest pixel, from the raw IPP / IOP / PixelSpacing of its file alone."""
    best = None
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        if best is None or pixels.max() > best[0]:
            row, column = np.unravel_index(np.argmax(pixels), pixels.shape)
            iop = np.array(ds.ImageOrientationPatient, dtype=float)
            spacing = np.array(ds.PixelSpacing, dtype=float)
            lps = (
                np.array(ds.ImagePositionPatient, dtype=float)
                + column * spacing[1] * iop[:3]
                + row * spacing[0] * iop[3:]
            )
            best = (pixels.max(), lps * [-1, -1, 1])
    return best[1]


def with_bead(hu: np.ndarray, ijk: tuple[int, int, int]) -> np.ndarray:
    """A copy of ``hu`` with a single 3000 HU voxel at ``ijk``."""
    beaded = hu.copy()
    beaded[ijk] = 3000
    return beaded


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "transfer_syntax, multiframe",
    [("explicit", False), ("implicit", False), ("rle", False), ("jpeg2000", False), ("explicit", True), ("rle", True)],
)
def test_write_then_read_gives_back_hu_and_affine(tmp_path, head_phantom, ras_affine, transfer_syntax, multiframe):
    hu = head_phantom((40, 36, 12))
    affine = ras_affine(rotation_x_deg=20.0, tilt_deg=0.0)
    write_series(tmp_path, hu, affine, transfer_syntax=transfer_syntax, multiframe=multiframe, file_names="shuffled")
    volume = read_series(tmp_path)
    assert volume.hu.dtype == np.int16  # slope 1 and a whole intercept: exact integers
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.metadata["original_shape"] == [40, 36, 12]
    np.testing.assert_allclose(volume.metadata["original_spacing_mm"], [0.8, 0.8, 2.0], atol=1e-6)


def test_names_and_order_do_not_matter(tmp_path, head_phantom, ras_affine):
    """Shuffled file names, UID names and a reversed stack all read as the same voxels in the same world."""
    hu = with_bead(head_phantom((32, 32, 10)), (5, 20, 3))
    affine = ras_affine()
    reversed_affine = affine.copy()
    reversed_affine[:3, 3] = affine[:3, :3] @ [0, 0, 9] + affine[:3, 3]  # slice 0 written last
    reversed_affine[:3, 2] *= -1
    write_series(tmp_path / "shuffled", hu, affine, file_names="shuffled")
    write_series(tmp_path / "uid", hu, affine, file_names="uid")
    write_series(tmp_path / "reversed", hu[:, :, ::-1], reversed_affine)
    volumes = [read_series(tmp_path / name) for name in ("shuffled", "uid", "reversed")]
    for volume in volumes:
        np.testing.assert_array_equal(volume.hu, hu)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    # in name order the slice positions are not sorted, so only sorting by position can give back hu
    positions = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in sorted((tmp_path / "shuffled").iterdir())]
    assert positions != sorted(positions)


# ------------------------------------------------------------------------------- independent readers
@pytest.mark.parametrize("geometry", ["axial", "reversed", "oblique20"])
def test_geometry_and_hu_match_simpleitk(tmp_path, head_phantom, ras_affine, geometry):
    hu = head_phantom((40, 36, 12))
    affine = ras_affine(rotation_x_deg=20.0 if geometry == "oblique20" else 0.0)
    if geometry == "reversed":  # superior slice first: the k axis points down
        affine[:3, 2] *= -1
    write_series(tmp_path, hu, affine, file_names="shuffled")
    volume = read_series(tmp_path)
    reference_hu, reference_affine = sitk_read(tmp_path)
    if geometry == "reversed":  # both readers sort along the normal; the world mapping is what must agree
        np.testing.assert_array_equal(volume.hu, hu[:, :, ::-1])
    np.testing.assert_array_equal(volume.hu, reference_hu)
    np.testing.assert_allclose(volume.affine, reference_affine, atol=1e-4)


def test_gantry_tilt_landmark_found_at_its_world_position(tmp_path, head_phantom, ras_affine):
    """A bead at known world coordinates in a 15-degree tilted series is found there within 0.5 mm."""
    bead = (20, 30, 10)
    affine = ras_affine(tilt_deg=15.0)
    hu = with_bead(head_phantom((40, 48, 20)), bead)
    bead_world = nib.affines.apply_affine(affine, bead)
    write_series(tmp_path / "dcm", hu, affine, rescale=(1.0, 0.0))  # dcm2niix corrects tilt of int16 data only
    volume = read_series(tmp_path / "dcm")
    assert volume.metadata["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    assert float(pydicom.dcmread(next((tmp_path / "dcm").iterdir())).GantryDetectorTilt) == pytest.approx(
        15.0, abs=1e-3
    )

    found = volume.world(np.argwhere(volume.hu > 2000)[0])
    assert np.linalg.norm(found - bead_world) < 0.5
    assert np.linalg.norm(header_world_of_brightest_pixel(tmp_path / "dcm") - bead_world) < 0.5
    # SimpleITK stacks the slices along the normal (it ignores the shear): same voxels, other world position
    reference_hu, reference_affine = sitk_read(tmp_path / "dcm")
    np.testing.assert_array_equal(volume.hu, reference_hu)
    assert np.linalg.norm(bright_centroid_world(reference_hu, reference_affine) - bead_world) > 5.0
    # dcm2niix resamples a tilt-corrected volume: the bead is where it was placed
    corrected = dcm2niix_volumes(tmp_path / "dcm", tmp_path / "nii")["_Tilt_1"]
    assert np.linalg.norm(bright_centroid_world(corrected.get_fdata(), corrected.affine) - bead_world) < 0.5


def test_uneven_spacing_is_interpolated_onto_the_median_grid(tmp_path, head_phantom):
    """Alternating 0.9 / 1.1 mm gaps: slices on the 1 mm grid are the originals, the others interpolated."""
    n_slices = 25
    offsets = np.concatenate([[0.0], np.cumsum([0.9, 1.1] * 12)])  # 0, 0.9, 2.0, 2.9, 4.0, ..., 24.0
    hu = with_bead(head_phantom((40, 36, n_slices)), (12, 14, 8))  # original slice 8 lies at 8.0 mm
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    positions = np.array([[10.0, -5.0, 30.0 + z] for z in offsets])
    write_series(tmp_path / "dcm", hu, affine, slice_positions_mm=positions, rescale=(1.0, 0.0), file_names="shuffled")
    volume = read_series(tmp_path / "dcm")

    assert volume.hu.shape == (40, 36, 25)
    expected_affine = affine.copy()
    expected_affine[:3, 3] = positions[0]
    np.testing.assert_allclose(volume.affine, expected_affine, atol=1e-4)
    original, _ = sitk_read(tmp_path / "dcm")  # SimpleITK keeps the uneven slices as they are
    np.testing.assert_array_equal(volume.hu[:, :, 0::2], original[:, :, 0::2])
    # 1.0 mm lies 0.1 of the 1.1 mm way from slice 1 (0.9 mm) to slice 2 (2.0 mm)
    expected = original[:, :, 1] * (1.0 / 1.1) + original[:, :, 2] * (0.1 / 1.1)
    np.testing.assert_allclose(volume.hu[:, :, 1], expected, atol=1e-3)
    bead_world = header_world_of_brightest_pixel(tmp_path / "dcm")
    assert np.linalg.norm(bright_centroid_world(volume.hu, volume.affine) - bead_world) < 0.5
    equidistant = dcm2niix_volumes(tmp_path / "dcm", tmp_path / "nii")["_Eq_1"]
    assert np.linalg.norm(bright_centroid_world(equidistant.get_fdata(), equidistant.affine) - bead_world) < 0.5


def test_small_uneven_gap_is_interpolated_and_large_gap_rejected(tmp_path, head_phantom):
    hu = head_phantom((32, 32, 12))
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    offsets = np.arange(12) * 2.0
    offsets[7:] += 0.6  # one gap of 2.6 mm = 1.3 x the median
    write_series(tmp_path / "small", hu, affine, slice_positions_mm=np.c_[np.zeros((12, 2)), offsets])
    volume = read_series(tmp_path / "small")
    assert volume.hu.shape[2] == int(offsets[-1] // 2.0) + 1
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.0], atol=1e-6)

    missing = np.delete(np.arange(12), 6)  # slice 6 (at 12 mm) lost: a 4 mm gap
    write_series(
        tmp_path / "gap", hu[:, :, missing], affine, slice_positions_mm=np.c_[np.zeros((11, 2)), missing * 2.0]
    )
    with pytest.raises(ScanError, match=r"^gap of 4\.00 mm at 10\.0 mm .*\(median 2\.00 mm\)$"):
        read_series(tmp_path / "gap")
    filled = read_series(tmp_path / "gap", SelectionConfig(reject_gaps=False))
    assert filled.hu.shape[2] == 12
    np.testing.assert_allclose(filled.hu[:, :, 6], (hu[:, :, 5] + hu[:, :, 7]) / 2, atol=1e-3)


def test_per_slice_rescale_and_padding(tmp_path, head_phantom, ras_affine):
    """Two halves of one series stored with different slope/intercept; padding pixels become air.

    The padding value (3000, in stored units) is 1976 HU in the first half, where it marks padding, and
    an ordinary 1976 HU in the second half, whose stored value there is 1488.
    """
    hu = head_phantom((32, 32, 10)).astype(np.float32)
    hu[:4, :4, :] = 1976
    affine = ras_affine(spacing_mm=(0.8, 0.8, 2.0))
    tags = {"SeriesInstanceUID": generate_uid(), "StudyInstanceUID": generate_uid(), "PixelPaddingValue": 3000}
    positions = nib.affines.apply_affine(affine, np.c_[np.zeros((10, 2)), np.arange(10)])
    write_series(tmp_path, hu[:, :, :5], affine, tags=tags, slice_positions_mm=positions[:5], file_names="uid")
    write_series(
        tmp_path,
        hu[:, :, 5:],
        affine,
        tags=tags,
        slice_positions_mm=positions[5:],
        rescale=(2.0, -1000.0),
        file_names="uid",
    )
    volume = read_series(tmp_path)
    expected = hu.copy()
    expected[:4, :4, :5] = -1024
    expected[:, :, 5:] = np.maximum(-1000 + 2 * np.rint((hu[:, :, 5:] + 1000) / 2), -1024)  # slope 2 rounds to even HU
    assert expected[0, 0, 5] == 1976
    np.testing.assert_array_equal(volume.hu, expected)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


def test_enhanced_ct_per_frame_groups_override_shared(tmp_path, head_phantom, ras_affine):
    """Per-frame PixelValueTransformation / PlanePosition take precedence over the shared groups."""
    hu = head_phantom((24, 20, 6))
    affine = ras_affine(rotation_x_deg=10.0)
    (path,) = write_series(tmp_path, hu, affine, multiframe=True)
    ds = pydicom.dcmread(path)
    for frame in ds.PerFrameFunctionalGroupsSequence[:3]:  # frames 0-2 say intercept -1000: 24 HU more
        transformation = pydicom.Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = "1", "-1000", "HU"
        frame.PixelValueTransformationSequence = pydicom.Sequence([transformation])
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(ds.PerFrameFunctionalGroupsSequence)[::-1])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()  # frames stored superior first
    ds.save_as(path)
    volume = read_series(path)
    expected = hu.astype(np.float32)
    expected[:, :, :3] += 24  # frames and their groups were reversed together: still slices 0-2
    np.testing.assert_array_equal(volume.hu, expected)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_below_bits_allocated(tmp_path, head_phantom, signed):
    """12-bit data in 16-bit words: bits above HighBit are ignored, the sign comes from bit 11."""
    hu = head_phantom((16, 16, 3)).astype(np.int16)
    intercept = 0.0 if signed else -1024.0
    paths = write_series(tmp_path, hu, np.diag([-1.0, -1.0, 3.0, 1.0]), rescale=(1.0, intercept))
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = np.frombuffer(ds.PixelData, dtype=np.int16 if signed else np.uint16)
        twelve_bits = stored.astype(np.uint16) & 0x0FFF  # two's complement in 12 bits, no sign extension
        ds.PixelData = (twelve_bits | 0xA000).astype(np.uint16).tobytes()  # junk (an overlay) above bit 11
        ds.BitsStored, ds.HighBit = 12, 11
        ds.save_as(path)
    np.testing.assert_array_equal(read_series(tmp_path).hu, np.maximum(hu, -1024))


# --------------------------------------------------------------------------------- real CT slices
def test_real_head_ct_slice_explicit_little_endian(real_slice_series):
    """pydicom-data's 693_UNCI.dcm (a CQ500 head CT slice): HU and geometry of a 4-slice stack."""
    folder = real_slice_series("693_UNCI.dcm", n_slices=4, spacing_mm=5.0)
    volume = read_series(folder)
    hu = volume.hu
    assert hu.shape == (512, 512, 4)
    assert 20 <= np.median(hu[236:276, 236:276, :]) <= 50  # brain
    assert hu.min() == -1024  # padding and the lossy halo outside the reconstruction circle are air
    air = hu[236:276, 10:40, :]  # in front of the forehead, inside the field of view
    assert -1030 <= np.median(air) <= -950
    assert np.percentile(hu, 99) > 500 and (hu > 700).mean() > 0.02  # skull
    assert ((hu >= 0) & (hu <= 80)).mean() > 0.15  # soft tissue
    expected = np.diag([-0.478516, -0.478516, 5.0, 1.0])
    expected[:3, 3] = [122.5, 112.4, 47.0]
    np.testing.assert_allclose(volume.affine, expected, atol=1e-4)
    assert volume.metadata["kernel"] == "STANDARD" and volume.metadata["kvp"] == 140.0
    assert volume.metadata["slice_thickness_mm"] == 5.0
    reference_hu, reference_affine = sitk_read(folder)
    np.testing.assert_allclose(volume.affine, reference_affine, atol=1e-3)
    inside = reference_hu > -1024  # SimpleITK keeps the raw values outside the field of view
    np.testing.assert_array_equal(volume.hu[inside], reference_hu[inside])


def test_real_head_ct_slice_jpeg2000_with_pixel_representation_mismatch(real_slice_series):
    """pydicom's J2K_pixelrep_mismatch.dcm: signed header, unsigned codestream; HU must stay plausible."""
    folder = real_slice_series("J2K_pixelrep_mismatch.dcm", n_slices=3, spacing_mm=5.0)
    volume = read_series(folder)
    hu = volume.hu
    assert 20 <= np.median(hu[236:276, 236:276, :]) <= 50  # brain
    assert -1030 <= np.median(hu[246:266, 5:20, :]) <= -950  # air in front of the face
    assert np.percentile(hu, 99) > 700  # bone
    assert hu.max() < 3000 and hu.min() == -1024
    # oblique plane (IOP column cosine 0, 0.9272, -0.3746): check the affine column by column
    column = np.array([0.0, 0.9272, -0.3746]) / np.linalg.norm([0.0, 0.9272, -0.3746])
    normal = np.cross([1.0, 0.0, 0.0], column)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(volume.affine[:3, 0], lps_to_ras * [0.431, 0, 0], atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1], lps_to_ras * column * 0.431, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 2], lps_to_ras * normal * 5.0, atol=1e-3)
    np.testing.assert_allclose(volume.affine[:3, 3], lps_to_ras * [-110.2153, -98.1898, 72.1446], atol=1e-4)
    assert volume.metadata["transfer_syntax"].startswith("JPEG 2000")


def test_real_enhanced_ct_multiframe_file():
    """pydicom's eCT_Supplemental.dcm: a real Enhanced CT file, geometry in the functional groups."""
    volume = read_series(get_testdata_file("eCT_Supplemental.dcm"))
    assert volume.hu.shape == (512, 512, 2)
    # IOP row (-1, 0, 0), column (0, 1, 0): the normal points inferior, so k runs from z -149 to z -159
    expected = np.diag([0.388672, -0.388672, -10.0, 1.0])
    expected[:3, 3] = [-99.5, 301.5, -149.0]
    np.testing.assert_allclose(volume.affine, expected, atol=1e-4)
    assert 20 <= np.median(volume.hu[236:276, 236:276, :]) <= 50
    assert volume.metadata["slice_thickness_mm"] == 10.0 and volume.metadata["manufacturer"] == "Acme Medical Devices"


def test_jpeg_ls_lossless_decodes_like_the_uncompressed_original(real_slice_series):
    """The JPEG-LS copy of pydicom's MR_small.dcm, relabelled as CT, decodes to the same values."""
    ct_labels = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    volume = read_series(real_slice_series("MR_small_jpeg_ls_lossless.dcm", n_slices=3, spacing_mm=2.0, tags=ct_labels))
    original = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.T.astype(np.float32)
    assert original.max() > 1000
    for k in range(3):
        np.testing.assert_array_equal(volume.hu[:, :, k], np.maximum(original, -1024))


# ------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def good_series(tmp_path, head_phantom):
    """A valid 8-slice series with identifiers that must never appear in an error message."""
    tags = {"PatientName": "Doe^Jane", "PatientID": "PID-31337", "SeriesInstanceUID": generate_uid()}
    hu = head_phantom((24, 24, 8))
    paths = write_series(tmp_path / "series", hu, np.diag([-1.0, -1.0, 2.0, 1.0]), tags=tags)
    return tmp_path / "series", paths, tags


def _reason(folder, config=None) -> str:
    with pytest.raises(ScanError) as raised:
        read_series(folder, config)
    return str(raised.value)


def _assert_private(reason: str, tags: dict) -> None:
    assert "\n" not in reason
    assert not any(str(value) in reason for value in tags.values())
    assert "Doe" not in reason and "31337" not in reason


def test_truncated_file(good_series):
    folder, paths, tags = good_series
    paths[3].write_bytes(paths[3].read_bytes()[:-200])
    reason = _reason(folder)
    assert reason.startswith("IM00004.dcm: pixel data is truncated")
    _assert_private(reason, tags)


def test_truncated_header_is_a_discovery_error(good_series):
    folder, paths, tags = good_series
    paths[2].write_bytes(paths[2].read_bytes()[:300])
    series, errors = discover([folder])
    assert len(series) == 1 and series[0].n_slices == 7
    assert [Path(path).name for path, _ in errors] == ["IM00003.dcm"]
    assert errors[0][1].startswith("unreadable DICOM header")
    reason = _reason(folder)
    assert reason.startswith("IM00003.dcm: unreadable DICOM header")
    _assert_private(reason, tags)


def test_no_pixel_data(good_series):
    folder, paths, tags = good_series
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    reason = _reason(folder)
    assert reason == "IM00001.dcm: no pixel data (or the file is truncated before it)"


def test_non_ct_modality(tmp_path, head_phantom):
    write_series(tmp_path, head_phantom((16, 16, 4)), np.eye(4), tags={"Modality": "MR"})
    assert _reason(tmp_path) == "modality MR is not CT"


def test_single_slice(tmp_path, head_phantom):
    write_series(tmp_path, head_phantom((16, 16, 1)), np.eye(4))
    assert _reason(tmp_path).startswith("single slice")


def test_frames_in_another_orientation_are_set_aside_and_an_even_split_refused(good_series):
    folder, paths, tags = good_series
    ds = pydicom.dcmread(paths[4])
    ds.SOPInstanceUID = generate_uid()
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal frame filed under the axial series
    ds.save_as(folder / "sagittal.dcm")
    volume = read_series(folder)
    np.testing.assert_array_equal(volume.hu, read_series_without(folder, "sagittal.dcm"))
    assert volume.metadata["notes"] == ["1 frames in another orientation set aside"]
    for path in paths[::2]:  # now half the slices tilted by 20 degrees: no main stack
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9397, -0.3420]
        ds.save_as(path)
    reason = _reason(folder)
    assert reason.startswith(
        "mixed orientations in one series (3 distinct ImageOrientationPatient, none held by most of its 9"
    )
    _assert_private(reason, tags)


def read_series_without(folder: Path, name: str) -> np.ndarray:
    """HU of the series in ``folder`` read from a copy without the file ``name``."""
    clean = folder.parent / f"{folder.name}_without_{name}"
    shutil.copytree(folder, clean, ignore=shutil.ignore_patterns(name))
    return read_series(clean).hu


def test_a_localizer_filed_under_the_series_is_set_aside(good_series):
    folder, paths, tags = good_series
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.Rows, ds.Columns, ds.PixelData = 12, 20, bytes(12 * 20 * 2)
    ds.save_as(folder / "AAA_scout.dcm")  # first in name order, as a scout often is
    (info,) = discover([folder])[0]
    assert info.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and [p.name for p, _ in info.set_aside] == [
        "AAA_scout.dcm"
    ]
    volume = read_series(info)
    np.testing.assert_array_equal(volume.hu, read_series_without(folder, "AAA_scout.dcm"))
    assert volume.metadata["notes"] == ["1 localizer images set aside"]


def test_an_unreadable_copy_of_a_slice_gives_way_to_a_readable_one(good_series, tmp_path):
    folder, paths, tags = good_series
    stray = tmp_path / "elsewhere" / "deeper"
    stray.mkdir(parents=True)
    (stray / "IM00004.dcm").write_bytes(paths[3].read_bytes()[:-200])  # same SOPInstanceUID, truncated
    (info,) = discover([tmp_path])[0]
    assert info.source.startswith(str(folder) + "#")  # named by its own folder, not the common parent
    assert info.files[3] == paths[3] and info.duplicates == {paths[3]: [stray / "IM00004.dcm"]}
    volume = read_series(info)
    np.testing.assert_array_equal(volume.hu, read_series(folder).hu)
    paths[3].write_bytes(paths[3].read_bytes()[:-100])  # now no copy of slice 4 is whole: the reason names it
    reason = _reason(tmp_path)
    assert reason.startswith("IM00004.dcm: pixel data is truncated")


def test_a_decoder_bomb_is_refused_before_any_decoder_runs(good_series):
    """An RLE file claiming 65535 x 65535 pixels would make a native decoder allocate 8 GiB."""
    folder, paths, tags = good_series
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.Rows = ds.Columns = 65535
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(paths[0], enforce_file_format=True)
    reason = _reason(folder)
    assert reason.startswith(
        "IM00001.dcm: implausible image size: 65535x65535 pixels x 1 frames would decode to 8.0 GiB"
    )


def test_duplicate_positions(good_series):
    folder, paths, tags = good_series
    shutil.copy(paths[2], folder / "copy_of_slice3")  # an identical file (same SOPInstanceUID): not used
    volume = read_series(folder)
    assert volume.hu.shape == (24, 24, 8)
    assert volume.metadata["notes"] == ["1 duplicate files of slices (same SOPInstanceUID) not used"]
    ds = pydicom.dcmread(paths[5])
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = pydicom.dcmread(paths[4]).ImagePositionPatient
    ds.save_as(folder / "other_image_same_place.dcm")
    reason = _reason(folder)
    assert reason == "duplicate slice positions: different images at 8.00 mm along the slice normal"


def test_undecodable_transfer_syntax(good_series):
    folder, paths, tags = good_series
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel handler decodes it
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(paths[0], enforce_file_format=True)
    reason = _reason(folder)
    assert reason.startswith("IM00001.dcm: cannot decode transfer syntax MPEG2 Main Profile / Main Level: ")
    _assert_private(reason, tags)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _reason(tmp_path / "empty") == f"empty folder: {tmp_path / 'empty'}"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    assert _reason(tmp_path / "notes") == f"no DICOM files: {tmp_path / 'notes'}"


def test_read_scan_requires_exactly_one_series(tmp_path, head_phantom):
    write_series(tmp_path / "a", head_phantom((16, 16, 4)), np.eye(4))
    write_series(tmp_path / "b", head_phantom((16, 16, 4)), np.eye(4))
    with pytest.raises(ScanError, match=r"^2 DICOM series in .*; expected exactly one$"):
        read_scan(tmp_path)
    assert read_scan(tmp_path / "a").hu.shape == (16, 16, 4)


# -------------------------------------------------------------------------------------- discovery
def test_discover_groups_by_series_and_skips_non_dicom(tmp_path, head_phantom):
    hu = head_phantom((16, 16, 6))
    study = generate_uid()
    write_series(tmp_path / "p1" / "soft", hu, np.eye(4), tags={"StudyInstanceUID": study, "ConvolutionKernel": "H30s"})
    bone_tags = {"StudyInstanceUID": study, "ConvolutionKernel": "H70h"}
    write_series(tmp_path / "p1" / "bone", hu, np.eye(4), tags=bone_tags, file_names="uid")
    write_series(tmp_path / "mf", hu, np.eye(4), multiframe=True)
    (tmp_path / "p1" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))
    (tmp_path / "p1" / "notes.txt").write_text("hello")
    (tmp_path / "p1" / "soft" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    series, errors = discover([tmp_path, tmp_path / "p1"])  # overlapping inputs: each file once
    assert errors == []
    by_kernel = {info.kernel: info for info in series}
    assert sorted(by_kernel) == ["H30s", "H70h", "STANDARD"]
    assert [len(by_kernel[k].files) for k in ("H30s", "H70h", "STANDARD")] == [6, 6, 1]
    multiframe = by_kernel["STANDARD"]
    assert (multiframe.n_slices, multiframe.number_of_frames) == (6, 6)
    assert multiframe.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"
    np.testing.assert_allclose(multiframe.orientation, [-1, 0, 0, 0, -1, 0])
    soft = by_kernel["H30s"]
    assert soft.source.startswith(str(tmp_path / "p1" / "soft") + "#") and soft.series_uid not in soft.source
    assert soft.slice_thickness_mm == 1.0 and soft.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")


def test_discover_reads_headers_only(tmp_path, head_phantom, monkeypatch):
    # Speed is measured in benchmarks/ingest.py; here: discovery never reads pixel data.
    hu = head_phantom((16, 16, 200))
    write_series(tmp_path, hu, np.eye(4))
    calls = []
    real_dcmread = pydicom.dcmread

    def recording_dcmread(*args, **kwargs):
        calls.append(kwargs)
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recording_dcmread)
    series, _ = discover([tmp_path])
    assert series[0].n_slices == 200
    assert len(calls) >= 200 and all(call.get("stop_before_pixels") for call in calls)


# -------------------------------------------------------------------------------------- selection
def _info(name: str, study: str = "study1", **fields) -> SeriesInfo:
    values = dict(
        series_uid=name,
        study_uid=study,
        patient_id="p1",
        files=[],
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        n_slices=120,
        slice_thickness_mm=1.0,
        kernel="STANDARD",
        orientation=np.array([1.0, 0, 0, 0, 1, 0]),
        series_description="",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        number_of_frames=1,
        source=f"/data/{name}#0",
    )
    values.update(fields)
    return SeriesInfo(**values)


def test_select_series_skips_non_candidates_with_reasons():
    tilt_35 = np.array([1.0, 0, 0, 0, np.cos(np.radians(35)), -np.sin(np.radians(35))])
    series = [
        _info("keep"),
        _info("scout", study="s2", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        _info("dose", study="s3", sop_class_uid="1.2.840.10008.5.1.4.1.1.7", n_slices=1),
        _info("mr", study="s4", modality="MR"),
        _info("few", study="s5", n_slices=12),
        _info("thick", study="s6", slice_thickness_mm=10.0),
        _info("sagittal", study="s7", orientation=np.array([0, 1.0, 0, 0, 0, -1])),
        _info("oblique35", study="s8", orientation=tilt_35),
        _info("keep", study="study1"),  # the same series listed twice: not a skip
    ]
    kept, skipped = select_series(series, SelectionConfig())
    assert [info.series_uid for info in kept] == ["keep"]
    assert dict(skipped) == {
        "/data/scout#0": "localizer/scout (ImageType LOCALIZER)",
        "/data/dose#0": "not a CT image series (SOP class Secondary Capture Image Storage)",
        "/data/mr#0": "modality MR is not CT",
        "/data/few#0": "12 slices, fewer than min_slices 20",
        "/data/thick#0": "slice thickness 10 mm outside 0.4..6 mm",
        "/data/sagittal#0": "not axial: slice normal 90 degrees from the S-I axis",
        "/data/oblique35#0": "not axial: slice normal 35 degrees from the S-I axis",
    }
    tilt_20 = np.array([1.0, 0, 0, 0, np.cos(np.radians(20)), -np.sin(np.radians(20))])
    kept, _ = select_series([_info("tilted20", orientation=tilt_20)], SelectionConfig())
    assert len(kept) == 1  # 20 degrees from axial is still axial


def test_select_series_prefers_soft_kernel_then_thin_then_most_slices():
    study = [
        _info("bone_thin", kernel="BONE", slice_thickness_mm=0.625),
        _info("soft_5mm", kernel="Hr40", slice_thickness_mm=5.0, n_slices=30),
        _info("soft_1mm_short", kernel="FC26", slice_thickness_mm=1.0, n_slices=150),
        _info("soft_1mm_long", kernel="UB", slice_thickness_mm=1.0, n_slices=160),
        _info("other_study", study="study2", kernel="J70h"),
    ]
    kept, skipped = select_series(study, SelectionConfig())
    assert sorted(info.series_uid for info in kept) == ["other_study", "soft_1mm_long"]
    assert len(skipped) == 3 and all(
        reason.startswith("another series of the study is preferred") for _, reason in skipped
    )
    kept, _ = select_series(study, SelectionConfig(prefer_kernel="bone"))
    assert sorted(info.series_uid for info in kept) == ["bone_thin", "other_study"]
    kept, skipped = select_series(study, SelectionConfig(series="all"))
    assert len(kept) == 5 and skipped == []


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("STANDARD", "soft"),
        ("SOFT", "soft"),
        ("BONE", "bone"),
        ("BONEPLUS", "bone"),
        ("LUNG", "bone"),
        ("DETAIL", "bone"),
        ("H30s", "soft"),
        ("Hr40", "soft"),
        ("Qr40\\3", "soft"),
        ("J45s", "soft"),
        ("H60s", "bone"),
        ("J70h", "bone"),
        ("Hr52", "unknown"),
        ("UA", "soft"),
        ("UB", "soft"),
        ("UC", "soft"),
        ("YC", "bone"),
        ("YD", "bone"),
        ("D", "bone"),
        ("E", "bone"),
        ("FC21", "soft"),
        ("FC26", "soft"),
        ("FC30", "bone"),
        ("FC35", "bone"),
        ("", "unknown"),
        ("XYZ", "unknown"),
    ],
)
def test_kernel_class(kernel, expected):
    assert kernel_class(kernel) == expected
