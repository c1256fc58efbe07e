"""Write a HU volume as a standard CT DICOM series: the inverse of ``read_series``.

Used by ``fmct synth`` (synthetic head CT delivered through the same door as real data), by the tests
(series with known geometry for the independent readers) and by the ingest benchmark.

Geometry follows the DICOM standard: ImageOrientationPatient (IOP) holds the row and column direction
cosines, PixelSpacing is (spacing between rows, spacing between columns), ImagePositionPatient (IPP) is
the centre of the first transmitted pixel of each slice; all in the LPS+ patient frame. The volume's
affine is RAS+, so x and y are negated on the way out.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from fmct.atomic import atomic_write_bytes
from fmct.io.dicom import gantry_tilt_deg

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}
FILE_NAMING = ("instance", "uid", "shuffled")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def write_series(
    folder,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    tags: dict | None = None,
    slice_positions_mm: np.ndarray | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    transfer_syntax: str = "explicit",
    multiframe: bool = False,
    file_names: str = "instance",
) -> list[Path]:
    """Write a valid CT Image Storage series (one file per slice, or one enhanced multi-frame file).

    Args:
        folder: output folder (created). Files are written atomically.
        hu: (I, J, K) HU, same axis convention as ``Volume``: the pixel_array of slice k is ``hu[:, :, k].T``
            (Rows = J, Columns = I).
        affine: 4x4 RAS voxel -> world mm, as in ``Volume``. IOP, IPP and PixelSpacing are derived from it
            (LPS in the files). A sheared affine (k column not perpendicular to the slice plane) is a
            gantry-tilted series: GantryDetectorTilt is set to the angle (degrees) between the k column and
            the slice normal (sign as in ``fmct.io.dicom.gantry_tilt_deg``).
        tags: DICOM keywords to set or override (PatientName, PatientID, StudyInstanceUID,
            SeriesInstanceUID, ConvolutionKernel, KVP, Manufacturer, SliceThickness, ImageType, Modality,
            ...). Defaults otherwise, with fresh Study/Series UIDs; SOP Instance UIDs are derived from the
            Series UID and the slice positions, so the same tags give the same files. Geometry and pixel
            tags come from the arrays.
        slice_positions_mm: optional (K, 3) RAS positions (mm) of the first pixel of each slice, overriding
            the affine's translation + k * column 2 (for uneven spacing or gaps).
        rescale: (slope, intercept); stored = round((hu - intercept) / slope), as uint16 when it fits, else
            int16 (PixelRepresentation follows).
        transfer_syntax: "explicit" (Explicit VR Little Endian), "implicit", "rle" (RLE Lossless) or
            "jpeg2000" (JPEG 2000 Lossless, needs pylibjpeg-openjpeg).
        multiframe: write one Enhanced CT Image Storage file with per-frame plane positions.
        file_names: "instance" (IM00001.dcm, ... in slice order), "uid" (the SOPInstanceUID, no extension)
            or "shuffled" (IM*.dcm numbered in a random order, so name order != position order).

    Returns:
        The written paths, in slice order (k = 0, 1, ...).
    """
    hu, affine = np.asarray(hu), np.asarray(affine, dtype=np.float64)
    _check_arguments(hu, affine, transfer_syntax, file_names)
    geometry = _lps_geometry(affine, slice_positions_mm, hu.shape[2])
    stored, pixel_representation = _stored_values(hu, *rescale)
    frames = np.ascontiguousarray(stored.transpose(2, 1, 0))  # (K, rows = J, columns = I)
    tags = dict(tags or {})
    study_uid = str(tags.get("StudyInstanceUID") or generate_uid())
    series_uid = str(tags.get("SeriesInstanceUID") or generate_uid())
    tags.setdefault("SliceThickness", format_number_as_ds(float(geometry["thickness_mm"])))
    base = _base_dataset(study_uid, series_uid, frames.shape[1:], pixel_representation, geometry, rescale)
    syntax_uid = TRANSFER_SYNTAXES[transfer_syntax]
    encode = _frame_encoder(syntax_uid, frames.shape[1:], pixel_representation)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if multiframe:
        return [_write_multiframe(folder, base, frames, geometry, rescale, tags, encode, syntax_uid, file_names)]
    return _write_slices(folder, base, frames, geometry, rescale, tags, encode, syntax_uid, file_names)


def _check_arguments(hu: np.ndarray, affine: np.ndarray, transfer_syntax: str, file_names: str) -> None:
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be a non-empty (I, J, K) array, got shape {hu.shape}")
    if not np.isfinite(hu).all():
        raise ValueError("hu holds NaN or inf values")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if file_names not in FILE_NAMING:
        raise ValueError(f"file_names must be one of {FILE_NAMING}, got {file_names!r}")


def _instance_uids(series_uid: str, geometry: dict) -> list[str]:
    """SOP Instance UIDs derived from the series UID and each slice's position, so the same tags give the
    same files and a series written in several calls gets distinct instance UIDs."""
    return [generate_uid(entropy_srcs=[series_uid, str(k), str(ipp)]) for k, ipp in enumerate(geometry["ipp"])]


def _write_multiframe(
    folder: Path,
    base: Dataset,
    frames: np.ndarray,
    geometry: dict,
    rescale,
    tags: dict,
    encode,
    syntax_uid,
    file_names: str,
) -> Path:
    """One Enhanced CT Image Storage file holding every frame."""
    ds = _enhanced_dataset(base, geometry, rescale, tags, len(frames))
    _apply_tags(ds, tags)
    sop_uid = _instance_uids(str(ds.SeriesInstanceUID), geometry)[0]
    _set_instance(ds, sop_uid, 1)
    _set_pixels(ds, frames, encode)
    path = folder / (sop_uid if file_names == "uid" else "IM00001.dcm")
    atomic_write_bytes(path, _encode_file(ds, syntax_uid))
    return path


def _write_slices(
    folder: Path,
    base: Dataset,
    frames: np.ndarray,
    geometry: dict,
    rescale,
    tags: dict,
    encode,
    syntax_uid,
    file_names: str,
) -> list[Path]:
    """One CT Image Storage file per slice, in slice order; their names follow ``file_names``."""
    ds = base
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = _ds_list(geometry["iop"])
    ds.PixelSpacing = _ds_list(geometry["pixel_spacing"])
    ds.RescaleSlope = format_number_as_ds(float(rescale[0]))
    ds.RescaleIntercept = format_number_as_ds(float(rescale[1]))
    ds.RescaleType = "HU"
    _apply_tags(ds, tags)
    series_uid = str(ds.SeriesInstanceUID)
    sop_uids = _instance_uids(series_uid, geometry)
    numbers = np.arange(1, len(frames) + 1)
    if file_names == "shuffled":
        seed = int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "little")
        numbers = np.random.default_rng(seed).permutation(numbers)
    paths = []
    for k in range(len(frames)):
        _set_instance(ds, sop_uids[k], k + 1)
        ds.ImagePositionPatient = _ds_list(geometry["ipp"][k])
        ds.SliceLocation = format_number_as_ds(float(geometry["ipp"][k] @ geometry["normal"]))
        _set_pixels(ds, frames[k : k + 1], encode)
        path = folder / (sop_uids[k] if file_names == "uid" else f"IM{numbers[k]:05d}.dcm")
        atomic_write_bytes(path, _encode_file(ds, syntax_uid))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ geometry
def _lps_geometry(affine: np.ndarray, slice_positions_mm: np.ndarray | None, n_slices: int) -> dict:
    """IOP, PixelSpacing, per-slice IPP, slice normal, thickness and tilt in the LPS frame of the files."""
    lps = _LPS_FROM_RAS @ affine[:3, :]
    column_step, row_step, slice_step = lps[:, 0], lps[:, 1], lps[:, 2]  # along I (a row), J, K
    spacing_i, spacing_j = np.linalg.norm(column_step), np.linalg.norm(row_step)
    if spacing_i == 0 or spacing_j == 0:
        raise ValueError("affine has a zero-length in-plane column")
    row_cosine, column_cosine = column_step / spacing_i, row_step / spacing_j
    if abs(row_cosine @ column_cosine) > 1e-6:
        raise ValueError("affine's in-plane columns (I, J) must be perpendicular: DICOM pixels are rectangular")
    normal = np.cross(row_cosine, column_cosine)
    if slice_positions_mm is None:
        ipp = lps[:, 3] + np.arange(n_slices)[:, None] * slice_step
    else:
        positions = np.asarray(slice_positions_mm, dtype=np.float64)
        if positions.shape != (n_slices, 3):
            raise ValueError(f"slice_positions_mm must have shape ({n_slices}, 3), got {positions.shape}")
        ipp = positions @ _LPS_FROM_RAS
    steps = np.diff(ipp, axis=0) if n_slices > 1 else slice_step[None, :]
    along_normal = steps @ normal
    thickness = float(np.median(np.abs(along_normal))) or float(np.linalg.norm(slice_step))
    return {
        "iop": np.concatenate([row_cosine, column_cosine]),
        "pixel_spacing": np.array([spacing_j, spacing_i]),  # (between rows, between columns)
        "ipp": ipp,
        "normal": normal,
        "thickness_mm": thickness,
        "tilt_deg": gantry_tilt_deg(steps.mean(axis=0), column_cosine, normal),
    }


def _ds_list(values: np.ndarray) -> list[str]:
    """Numbers as DICOM decimal strings (16 characters at most) with as many digits as fit."""
    return [format_number_as_ds(float(v) + 0.0) for v in values]  # + 0.0 turns -0.0 into 0.0


# ---------------------------------------------------------------------------------------- pixel data
def _stored_values(hu: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored integers for ``hu`` and the PixelRepresentation (0 unsigned, 1 signed) they need."""
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    low, high = float(stored.min()), float(stored.max())
    if low >= 0 and high <= 65535:
        return stored.astype(np.uint16), 0
    if low >= -32768 and high <= 32767:
        return stored.astype(np.int16), 1
    raise ValueError(f"HU {hu.min():g}..{hu.max():g} with slope {slope:g}, intercept {intercept:g} do not fit 16 bits")


def _frame_encoder(syntax_uid, shape: tuple[int, int], pixel_representation: int):
    """A function (rows, columns) array -> encoded frame bytes, or None for native (uncompressed) data."""
    if not syntax_uid.is_compressed:
        return None
    encoder = pydicom.pixels.get_encoder(syntax_uid)
    if not encoder.is_available:
        missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in encoder.missing_dependencies)
        raise RuntimeError(f"cannot encode {syntax_uid.name}: no encoder plugin installed ({missing})")
    options = {
        "rows": shape[0],
        "columns": shape[1],
        "number_of_frames": 1,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 16,
        "pixel_representation": pixel_representation,
        "photometric_interpretation": "MONOCHROME2",
    }
    return lambda frame: encoder.encode(frame, **options)


def _set_pixels(ds: Dataset, frames: np.ndarray, encode) -> None:
    """Put (n, rows, columns) stored values into ``ds`` natively or encapsulated, one fragment per frame."""
    if encode is None:
        ds.PixelData = frames.astype("<" + frames.dtype.str[1:], copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        ds["PixelData"].is_undefined_length = False
    else:
        ds.PixelData = encapsulate([encode(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True


# ------------------------------------------------------------------------------------------ datasets
def _base_dataset(study_uid, series_uid, shape, pixel_representation, geometry, rescale) -> Dataset:
    """The tags shared by every file of the series, with neutral defaults for patient and equipment."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "CT"
    ds.PatientName = "Anonymous^Synthetic"
    ds.PatientID = "ANON0000"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame of reference"])
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "HEAD"
    ds.Manufacturer = "fmct"
    ds.ManufacturerModelName = "synthetic"
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.BodyPartExamined = "HEAD"
    ds.GantryDetectorTilt = format_number_as_ds(geometry["tilt_deg"])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.BurnedInAnnotation = "NO"
    return ds


def _enhanced_dataset(base: Dataset, geometry: dict, rescale, tags: dict, n_frames: int) -> Dataset:
    """Enhanced CT: geometry and rescale in the shared / per-frame functional groups (Multi-frame module)."""
    ds = base
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = n_frames
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.LossyImageCompression = "00"
    ds.ContentDate = ""
    ds.ContentTime = ""
    ds.AcquisitionDateTime = ""
    ds.AcquisitionDuration = 0.0
    ds.AcquisitionNumber = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_group(geometry, rescale, tags.pop("SliceThickness"))])
    _set_dimensions(ds, generate_uid(entropy_srcs=[str(base.SeriesInstanceUID), "dimensions"]))
    ds.PerFrameFunctionalGroupsSequence = Sequence([_frame_group(geometry["ipp"][k], k) for k in range(n_frames)])
    return ds


def _shared_group(geometry: dict, rescale, slice_thickness: str) -> Dataset:
    """The functional groups every frame shares: pixel measures, orientation, rescale, frame type."""
    measures = Dataset()
    measures.PixelSpacing = _ds_list(geometry["pixel_spacing"])
    measures.SliceThickness = slice_thickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds_list(geometry["iop"])
    transformation = Dataset()
    transformation.RescaleSlope = format_number_as_ds(float(rescale[0]))
    transformation.RescaleIntercept = format_number_as_ds(float(rescale[1]))
    transformation.RescaleType = "HU"
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transformation])
    shared.CTImageFrameTypeSequence = Sequence([frame_type])
    return shared


def _set_dimensions(ds: Dataset, dimension_uid: str) -> None:
    """A 3D dimension organisation indexed by (StackID, InStackPositionNumber)."""
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = Sequence([organization])
    ds.DimensionOrganizationType = "3D"
    dimensions = []
    for keyword in ("StackID", "InStackPositionNumber"):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = dimension_uid
        dimension.DimensionIndexPointer = tag_for_keyword(keyword)
        dimension.FunctionalGroupPointer = tag_for_keyword("FrameContentSequence")
        dimensions.append(dimension)
    ds.DimensionIndexSequence = Sequence(dimensions)


def _frame_group(ipp: np.ndarray, k: int) -> Dataset:
    """Frame ``k``'s own functional groups: its position (LPS mm) and its place in the stack."""
    position = Dataset()
    position.ImagePositionPatient = _ds_list(ipp)
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = k + 1
    content.DimensionIndexValues = [1, k + 1]
    group = Dataset()
    group.PlanePositionSequence = Sequence([position])
    group.FrameContentSequence = Sequence([content])
    return group


def _apply_tags(ds: Dataset, tags: dict) -> None:
    for keyword, value in tags.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword in tags: {keyword!r}")
        setattr(ds, keyword, value)


def _set_instance(ds: Dataset, sop_uid: str, instance_number: int) -> None:
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number


def _encode_file(ds: Dataset, syntax_uid) -> bytes:
    """The complete Part 10 file (preamble, file meta, dataset) as bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
