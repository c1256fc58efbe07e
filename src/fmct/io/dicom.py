"""DICOM CT series: discovery in folder trees, head-CT series selection, and reading into a ``Volume``.

Geometry follows the DICOM standard (PS3.3 C.7.6.2): ImageOrientationPatient (IOP) gives the row and
column direction cosines, PixelSpacing is (spacing between rows, spacing between columns),
ImagePositionPatient (IPP) is the centre of the first transmitted pixel, all in the LPS+ patient frame.
Slices are ordered by their position along the slice normal (row x column cosine), never by
InstanceNumber or file name. The stack direction comes from the IPPs themselves, so a gantry-tilted
series gives a sheared affine that resampling later corrects.

Each file is parsed once: discovery reads its header up to the pixel data, keeping what reading needs
(geometry, rescale, pixel format and where the pixel values start), so that reading a classic
uncompressed slice is a seek and a read. Anything else (compressed, multi-frame, or a file that changed
since) is read again in full through pydicom.

Archives are untidy, so a series keeps its main stack when parts of it are odd: a copy of a slice
(same SOPInstanceUID) that cannot be read gives way to a readable copy, and localizer images or frames
in another orientation filed under the series are set aside with a note in ``Volume.metadata["notes"]``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID

from fmct.config import SelectionConfig
from fmct.errors import FileScanError, ScanError
from fmct.io.volume import Volume
from fmct.pseudonym import scrubbed_reason

AIR_HU = -1024.0  # padding voxels and anything below it (outside the reconstruction circle) become air
CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_NOT_A_SCAN_IMAGE_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SCREEN SAVE"}
_MAX_AXIAL_TILT_DEG = 30.0
# A header whose image would decode to more than this is refused before any decoder runs: a corrupt or
# hostile file claiming 65535 x 65535 pixels must not get a native decoder to allocate 8 GiB.
_MAX_DECODED_BYTES = 4 * 2**30
# Uncompressed little-endian syntaxes whose pixel bytes are read directly (pydicom inflates Deflated).
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
# Of those, the ones whose pixel bytes lie in the file as they are: (transfer syntax, explicit VR).
_PLAIN_SYNTAXES = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
# Tags discovery parses: selection's, and everything reading a classic slice needs. As Tag values, so
# that pydicom does not look each keyword up again for every file.
_HEADER_TAGS = [
    Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "ImageType",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "PatientID",
        "SliceThickness",
        "ConvolutionKernel",
        "ImageOrientationPatient",
        "SeriesDescription",
        "NumberOfFrames",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "ImagePositionPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "SamplesPerPixel",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "KVP",
        "Manufacturer",
        "ManufacturerModelName",
    )
]
_UID_PATTERN = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@dataclass
class SeriesInfo:
    """One discovered series, from headers only (no pixel data read).

    ``series_uid``, ``study_uid`` and ``patient_id`` are identifiers: ingest turns them into keyed
    pseudonyms, nothing stores them. ``files`` holds one file per SOP instance (the copy in the series'
    main folder first); ``duplicates`` maps a file to the other copies of the same instance, tried in
    order when it cannot be read. ``set_aside`` lists (file, reason) of localizer images filed under the
    series, left out of it. ``orientation`` is the commonest IOP (6,) in LPS (row then column cosines).
    ``n_slices`` counts frames (a multi-frame file counts all its frames); ``number_of_frames`` is the
    largest NumberOfFrames of a file (1 for classic one-slice-per-file series). ``source`` names the
    series for the user: the folder holding most of its files, "#", a short hash of the series UID. It
    holds real folder names, so ingest stores only its pseudonym. ``parsed`` holds, for each classic
    uncompressed file of ``files``, its header as discovery parsed it (:class:`ParsedSlice`), so that
    reading it needs no second parse. ``acquisition`` holds the safe facts of its first file: ``kvp``,
    ``manufacturer``, ``model`` and ``transfer_syntax`` (a name).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    files: list[Path]
    modality: str
    image_type: tuple[str, ...]
    n_slices: int
    slice_thickness_mm: float | None
    kernel: str
    orientation: np.ndarray | None
    series_description: str
    sop_class_uid: str
    number_of_frames: int
    source: str
    duplicates: dict[Path, list[Path]] = field(default_factory=dict)
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    parsed: dict[Path, "ParsedSlice"] = field(default_factory=dict)
    acquisition: dict = field(default_factory=dict)

    @property
    def all_files(self) -> list[Path]:
        """Every file of the series: its instances, their other copies, and what was set aside."""
        return (
            self.files
            + [copy for copies in self.duplicates.values() for copy in copies]
            + [p for p, _ in self.set_aside]
        )


# ------------------------------------------------------------------------------------------ discovery
def discover(paths: Iterable[str | Path]) -> tuple[list[SeriesInfo], list[tuple[str, str]]]:
    """Find the DICOM series under ``paths`` (folders walked recursively, and single files).

    Files are grouped by SeriesInstanceUID from their headers only, and within a series by
    SOPInstanceUID (copies of one instance are kept as alternatives). Files with or without ``.dcm``
    are read; DICOMDIR files and files without the DICOM Part 10 preamble are not part of any series
    (:func:`unused_file_reason` says why).

    Returns:
        (series, errors): series sorted by source; errors as (path or series source, one-line reason
        without the path) for folders that cannot be listed, DICOM files whose header cannot be read
        (truncated, corrupt, no SeriesInstanceUID) and series with a malformed header value.
    """
    files, unlisted = walk_files(paths)
    series, errors, _ = discover_files(files)
    return series, unlisted + errors


def discover_files(files: list[Path]) -> tuple[list[SeriesInfo], list[tuple[str, str]], set[Path]]:
    """:func:`discover` on a list of files, also returning the files it accounted for: those of every
    series and of every error (a series with a malformed header value covers all its files)."""
    headers: dict[str, list[tuple[Path, Dataset]]] = {}
    parsed: dict[Path, ParsedSlice] = {}
    errors: list[tuple[str, str]] = []
    covered: set[Path] = set()
    for path in files:
        header, pixel_offset, reason = _read_header(path)
        if reason:
            errors.append((str(path), reason))
            covered.add(path)
        elif header is not None:
            headers.setdefault(_text_value(header, "SeriesInstanceUID"), []).append((path, header))
            covered.add(path)
            classic = _parsed_slice(path, header, pixel_offset)
            if classic is not None:
                parsed[path] = classic
    series = []
    for uid, members in headers.items():
        try:
            series.append(_series_info(uid, members, parsed))
        except Exception as error:  # a malformed header value must not stop discovery of the rest
            errors.append(
                (_source_name([path for path, _ in members], uid), f"unreadable DICOM header: {scrubbed_reason(error)}")
            )
    return sorted(series, key=lambda info: info.source), errors, covered


def unused_file_reason(path: str | Path) -> str:
    """Why a file that is in no series and no NIfTI is not a scan: empty, a DICOMDIR, or not DICOM."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError as error:
        return f"cannot read the file ({error.strerror or type(error).__name__})"
    if path.name.upper() == "DICOMDIR" or (_has_dicom_preamble(path) and _is_dicomdir(path)):
        return "a DICOMDIR (the index of a DICOM medium), not an image"
    return "neither DICOM (no 'DICM' marker at byte 128) nor NIfTI (.nii, .nii.gz)"


def truncated_files(info: SeriesInfo) -> list[tuple[str, str]]:
    """(file, one-line reason without the path) of each classic file of ``info`` that is too short for the
    pixel values its header announces (cut by a copy or a transfer). From file sizes alone, so a series
    rejected before it is read can still say which of its files is broken, in the words reading would use."""
    cut = []
    for path, parsed in info.parsed.items():
        present = max(0, _size(path) - parsed.pixel_offset - parsed.element_bytes)
        if present < parsed.n_bytes:
            cut.append((str(path), f"pixel data is truncated ({present} of {parsed.n_bytes} bytes)"))
    return cut


def walk_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every regular file under ``paths``, each once, in a stable order; and (folder, one-line reason
    without the path) for every folder whose files cannot be listed (permission denied, say), which a
    plain walk would pass over as if it were empty."""
    seen: set[Path] = set()
    files: list[Path] = []
    unlisted: list[tuple[str, str]] = []

    def note(error: OSError) -> None:
        unlisted.append(
            (str(error.filename), f"cannot list its files ({(error.strerror or type(error).__name__).lower()})")
        )

    for root in paths:
        root = Path(root)
        candidates: Iterable[Path]
        if root.is_dir():
            candidates = (
                Path(folder) / name
                for folder, subfolders, names in sorted(os.walk(root, onerror=note))
                for name in sorted(names)
            )
        else:
            candidates = [root]
        for path in candidates:
            resolved = path.resolve()
            if resolved not in seen and resolved.is_file():
                seen.add(resolved)
                files.append(path)
    return files, unlisted


def _read_header(path: Path) -> tuple[Dataset | None, int, str]:
    """(header, byte offset where parsing stopped: the PixelData element, "") of an image file of a
    series; (None, 0, reason) for a DICOM file whose header is unreadable; (None, 0, "") for a file that
    is not a DICOM image (left to :func:`unused_file_reason`)."""
    if path.name.upper() == "DICOMDIR" or not _has_dicom_preamble(path):
        return None, 0, ""
    try:
        with open(path, "rb") as handle:
            header = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            pixel_offset = handle.tell()  # pydicom stops at the start of the PixelData element
    except Exception as error:  # any parse failure of a file that claims to be DICOM is reported
        return None, 0, f"unreadable DICOM header: {scrubbed_reason(error)}"
    if _text_value(header, "SOPClassUID") == _DICOMDIR_SOP_CLASS:
        return None, 0, ""
    if not _text_value(header, "SeriesInstanceUID"):
        return None, 0, "unreadable DICOM header: no SeriesInstanceUID (incomplete or truncated file)"
    return header, pixel_offset, ""


def _has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` holds 'DICM' after the 128-byte preamble (what dcmread(force=False) requires)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _is_dicomdir(path: Path) -> bool:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(header.file_meta.get("MediaStorageSOPClassUID", header.get("SOPClassUID", ""))) == _DICOMDIR_SOP_CLASS


def _series_info(series_uid: str, members: list[tuple[Path, Dataset]], parsed: dict[Path, "ParsedSlice"]) -> SeriesInfo:
    """The series of ``members`` (path, header): one file per SOP instance, localizers set aside;
    ``parsed`` holds the classic files' parsed headers (those of the series' files are kept)."""
    main_folder = _main_folder([path for path, _ in members])
    instances = _instances(members, main_folder)
    localizers = [m for m in instances if _NOT_A_SCAN_IMAGE_TYPES.intersection(_image_type(m[0][1]))]
    set_aside = []
    if len(localizers) < len(instances):  # a localizer inside a series of slices: the slices are the scan
        set_aside = [
            (
                copies[0][0],
                "localizer image ("
                f"{'/'.join(sorted(_NOT_A_SCAN_IMAGE_TYPES.intersection(_image_type(copies[0][1]))))})",
            )
            for copies in localizers
        ]
        instances = [copies for copies in instances if copies not in localizers]
    first = instances[0][0][1]
    frames = [int(_text_value(copies[0][1], "NumberOfFrames") or 1) for copies in instances]
    measures = _functional_item(first, "PixelMeasuresSequence")
    thickness = first.get("SliceThickness") or (measures.get("SliceThickness") if measures else None)
    return SeriesInfo(
        series_uid=series_uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        files=[copies[0][0] for copies in instances],
        modality=str(first.get("Modality", "")),
        image_type=_image_type(first),
        n_slices=sum(frames),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        kernel=_kernel_name(first),
        orientation=_commonest_orientation([copies[0][1] for copies in instances]),
        series_description=str(first.get("SeriesDescription", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        number_of_frames=max(frames),
        source=_source_name([path for path, _ in members], series_uid),
        duplicates={copies[0][0]: [path for path, _ in copies[1:]] for copies in instances if len(copies) > 1},
        set_aside=set_aside,
        parsed={copies[0][0]: parsed[copies[0][0]] for copies in instances if copies[0][0] in parsed},
        acquisition={
            "kvp": _float_or_none(first.get("KVP")),
            "manufacturer": str(first.get("Manufacturer", "")),
            "model": str(first.get("ManufacturerModelName", "")),
            "transfer_syntax": UID(str(first.file_meta.get("TransferSyntaxUID", ""))).name,
        },
    )


def _instances(members: list[tuple[Path, Dataset]], main_folder: str) -> list[list[tuple[Path, Dataset]]]:
    """Members grouped by SOPInstanceUID, in path order; within a group the copy in ``main_folder``
    first, then the largest file (a truncated copy is shorter)."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, header in sorted(members, key=lambda member: str(member[0])):
        groups.setdefault(_text_value(header, "SOPInstanceUID") or str(path), []).append((path, header))
    for copies in groups.values():
        copies.sort(key=lambda member: (str(member[0].parent) != main_folder, -_size(member[0]), str(member[0])))
    return sorted(groups.values(), key=lambda copies: str(copies[0][0]))


def _main_folder(files: list[Path]) -> str:
    """The folder holding most of ``files`` (the first in path order on a tie)."""
    counts = Counter(str(path.parent) for path in files)
    return min(counts, key=lambda folder: (-counts[folder], folder))


def _source_name(files: list[Path], series_uid: str) -> str:
    """The series' main folder plus a short hash of its UID (several series may share a folder)."""
    return f"{_main_folder(files)}#{hashlib.sha256(series_uid.encode()).hexdigest()[:10]}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _image_type(header: Dataset) -> tuple[str, ...]:
    return tuple(value.upper() for value in _text_values(header, "ImageType"))


def _commonest_orientation(headers: list[Dataset]) -> np.ndarray | None:
    """The IOP (6,) most files of the series share (classic IOP or the enhanced shared group), or None."""
    found = []
    for header in headers:
        item = _functional_item(header, "PlaneOrientationSequence")
        iop = _text_values(header, "ImageOrientationPatient") or (
            _text_values(item, "ImageOrientationPatient") if item else []
        )
        if len(iop) == 6:
            found.append(tuple(round(float(v), 4) for v in iop))
    return np.array(Counter(found).most_common(1)[0][0]) if found else None


def _functional_item(ds: Dataset, keyword: str, frame_group: Dataset | None = None) -> Dataset | None:
    """The item of functional group ``keyword`` for a frame: per-frame group first, then shared group."""
    for group in (frame_group, _first_item(ds, "SharedFunctionalGroupsSequence")):
        if group is not None:
            item = _first_item(group, keyword)
            if item is not None:
                return item
    return None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    if ds.get_item(_tag(keyword)) is None:  # the usual case (classic CT), without pydicom's keyword lookup
        return None
    sequence = ds.get(keyword)
    return sequence[0] if sequence else None


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _kernel_name(ds: Dataset) -> str:
    return "\\".join(str(value).strip() for value in _as_list(ds.get("ConvolutionKernel")))


# ------------------------------------------------------------------------------------------ selection
def kernel_class(kernel: str) -> str:
    """Classify a reconstruction kernel name as "soft" (brain / standard), "bone" (sharp) or "unknown".

    Covers GE (STANDARD, SOFT / BONE, BONEPLUS, LUNG, DETAIL, EDGE), Siemens (a family letter, optional
    lower-case letter, and a sharpness number: 'H30s', 'Hr40', 'J70h', 'Qr40'; <= 45 soft, >= 60 sharp),
    Philips (A, B, C, UA, UB, UC soft; D, E, L, YA..YE sharp) and Toshiba/Canon (FC01..FC29 soft,
    FC30 and above sharp). For multi-valued kernels ('Hr40\\3') the first value decides.
    """
    name = kernel.split("\\")[0].strip()
    upper = name.upper()
    if upper in {"STANDARD", "SOFT", "STND", "SMOOTH", "BRAIN", "A", "B", "C", "UA", "UB", "UC"}:
        return "soft"
    if upper in {"BONE", "BONEPLUS", "LUNG", "DETAIL", "EDGE", "SHARP", "D", "E", "L", "YA", "YB", "YC", "YD", "YE"}:
        return "bone"
    canon = re.fullmatch(r"FC(\d{2})", upper)
    if canon:
        return "soft" if int(canon.group(1)) < 30 else "bone"
    siemens = re.fullmatch(r"[A-Z][a-z]?(\d{2})[a-z]?(?:\s.*)?", name)
    if siemens:
        sharpness = int(siemens.group(1))
        return "soft" if sharpness <= 45 else "bone" if sharpness >= 60 else "unknown"
    if "BONE" in upper or "SHARP" in upper or "LUNG" in upper:
        return "bone"
    if "SOFT" in upper or "BRAIN" in upper or "STANDARD" in upper:
        return "soft"
    return "unknown"


def select_series(series: list[SeriesInfo], config: SelectionConfig) -> tuple[list[SeriesInfo], list[tuple[str, str]]]:
    """Keep the head CT series to ingest, by the rules of ``config`` (see ``SelectionConfig``).

    A series is a candidate when its Modality is ``config.modality``, its SOP class is a CT image (not
    a dose report or secondary capture), its ImageType is not a localizer/scout, it has at least
    ``config.min_slices`` slices (frames count), its slice thickness (mm) is within
    ``config.thickness_range_mm`` and, with ``config.axial_only``, its slice normal is within 30 degrees
    of the S-I axis. With ``config.series == "preferred"`` one candidate per study is kept: the preferred
    kernel class (``config.prefer_kernel``), then the thinnest slices, then the most slices.

    Returns:
        (kept, skipped): skipped holds (source, one-line reason) for every series not kept, except a
        repeat of a kept series (the same SeriesInstanceUID listed twice), which is dropped silently.
    """
    skipped: list[tuple[str, str]] = []
    candidates: list[SeriesInfo] = []
    seen_uids: set[str] = set()
    for info in series:
        if info.series_uid in seen_uids:
            continue
        seen_uids.add(info.series_uid)
        reason = _rejection_reason(info, config)
        if reason:
            skipped.append((info.source, reason))
        else:
            candidates.append(info)
    if config.series == "all":
        return candidates, skipped

    by_study: dict[tuple[str, str], list[SeriesInfo]] = {}
    for info in candidates:
        by_study.setdefault((info.patient_id, info.study_uid), []).append(info)
    kept = []
    for members in by_study.values():
        ranked = sorted(members, key=lambda info: _preference_key(info, config.prefer_kernel))
        best = ranked[0]
        kept.append(best)
        for other in ranked[1:]:
            reason = f"another series of the study is preferred: {_describe(best)} over {_describe(other)}"
            skipped.append((other.source, reason))
    return kept, skipped


def _rejection_reason(info: SeriesInfo, config: SelectionConfig) -> str:
    """Why ``info`` is not a head CT candidate, or "" when it is."""
    if info.modality.upper() != config.modality.upper():
        return f"modality {info.modality or 'missing'} is not {config.modality}"
    if info.sop_class_uid not in CT_IMAGE_SOP_CLASSES:
        return f"not a CT image series (SOP class {UID(info.sop_class_uid).name or 'missing'})"
    not_a_scan = _NOT_A_SCAN_IMAGE_TYPES.intersection(info.image_type)
    if not_a_scan:
        return f"localizer/scout (ImageType {'/'.join(sorted(not_a_scan))})"
    if info.n_slices < config.min_slices:
        return f"{info.n_slices} slices, fewer than min_slices {config.min_slices}"
    low, high = config.thickness_range_mm
    if info.slice_thickness_mm is not None and not low <= info.slice_thickness_mm <= high:
        return f"slice thickness {info.slice_thickness_mm:g} mm outside {low:g}..{high:g} mm"
    if config.axial_only and info.orientation is not None:
        angle = _angle_from_axial_deg(info.orientation)
        if angle > _MAX_AXIAL_TILT_DEG:
            return f"not axial: slice normal {angle:.0f} degrees from the S-I axis"
    return ""


def _angle_from_axial_deg(orientation: np.ndarray) -> float:
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / norm)))) if norm else 90.0


def _preference_key(info: SeriesInfo, prefer_kernel: str) -> tuple:
    kernel_rank = {"soft": {"soft": 0, "unknown": 1, "bone": 2}, "bone": {"bone": 0, "unknown": 1, "soft": 2}}
    rank = kernel_rank[prefer_kernel][kernel_class(info.kernel)] if prefer_kernel != "any" else 0
    thickness = info.slice_thickness_mm if info.slice_thickness_mm is not None else float("inf")
    return (rank, thickness, -info.n_slices, info.source)


def _describe(info: SeriesInfo) -> str:
    thickness = f"{info.slice_thickness_mm:g} mm" if info.slice_thickness_mm is not None else "unknown thickness"
    return f"[{kernel_class(info.kernel)} kernel '{info.kernel}', {thickness}, {info.n_slices} slices]"


# ------------------------------------------------------------------------------------------- reading
def read_series(info_or_path: SeriesInfo | str | Path, config: SelectionConfig | None = None) -> Volume:
    """Read one series into a ``Volume``: HU (I, J, K; int16 when the rescale is exact, else float32) and its
    RAS voxel -> world (mm) affine.

    ``info_or_path`` is a ``SeriesInfo`` from ``discover``, a folder holding exactly one series, or one
    DICOM file (a multi-frame file, or a single slice, which is an error). ``config`` supplies the modality
    and the gap rules (``max_gap_ratio``, ``reject_gaps``); defaults when None.

    HU = stored value x RescaleSlope + RescaleIntercept, per slice (per frame for enhanced CT); padding
    voxels (PixelPaddingValue / PixelPaddingRangeLimit) and values below -1024 HU become -1024 HU (air).
    Slices at the same position are dropped when identical. Slightly uneven spacing is linearly
    interpolated onto a uniform grid at the median spacing along the slice normal; a gap above
    ``max_gap_ratio`` x the median spacing is rejected (or interpolated when ``reject_gaps`` is False).
    A slice whose file cannot be read is replaced by a readable copy of it when there is one; frames in
    an orientation other than that of most frames are set aside. ``metadata["notes"]`` says what was.

    Raises:
        FileScanError: naming the file, for a slice that cannot be read (and has no readable copy).
        ScanError: with a one-line reason (never an identifier) for any other input that cannot be used.
    """
    config = config or SelectionConfig()
    info = info_or_path if isinstance(info_or_path, SeriesInfo) else _info_for_path(Path(info_or_path))
    notes = [f"{len(info.set_aside)} localizer images set aside"] if info.set_aside else []
    instances = [
        _read_instance(path, info.parsed.get(path), info.duplicates.get(path, []), notes) for path in info.files
    ]
    if info.duplicates:
        notes.append(
            f"{sum(map(len, info.duplicates.values()))} duplicate files of slices (same SOPInstanceUID) not used"
        )
    _check_ct_images(instances, config)
    slices = _collect_slices(instances)
    hu_stack, affine, tilt_deg = _stack_slices(slices, config, notes)
    return _series_volume(info, hu_stack, affine, tilt_deg, notes)


def _series_volume(
    info: SeriesInfo, hu_stack: np.ndarray, affine: np.ndarray, tilt_deg: float, notes: list[str]
) -> Volume:
    """The ``Volume`` of a stacked series: (K, rows, columns) HU viewed as (I, J, K), safe metadata only."""
    metadata = {
        "kernel": info.kernel,
        **info.acquisition,
        "slice_thickness_mm": info.slice_thickness_mm,
        "original_shape": [int(n) for n in hu_stack.shape[::-1]],
        "original_spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "gantry_tilt_deg": tilt_deg,
        "notes": notes,
    }
    identity = {"patient_id": info.patient_id, "study_uid": info.study_uid, "series_uid": info.series_uid}
    # (K, rows, columns) -> (I, J, K): a transposed view, no copy (Fortran-ordered in I, J, K)
    return Volume(
        hu=hu_stack.transpose(2, 1, 0), affine=affine, metadata=metadata, identity=identity, source=info.source
    )


def _info_for_path(path: Path) -> SeriesInfo:
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder")
    series, errors = discover([path])
    if errors:
        bad_path, reason = errors[0]
        raise FileScanError(bad_path, reason)
    if not series:
        what = "empty folder" if path.is_dir() and not any(path.iterdir()) else "no DICOM files"
        raise ScanError(f"{what}: {path}" if path.is_dir() else f"not a DICOM file: {path}")
    if len(series) > 1:
        raise ScanError(f"{len(series)} DICOM series in {path}; expected exactly one")
    return series[0]


# (IOP (6,), IPP (3,) mm, PixelSpacing (2,) mm, rescale slope, rescale intercept) of one frame, LPS
FrameGeometry = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float, float]


@dataclass(frozen=True)
class ImageHeader:
    """What reading needs of one image file's header: SOP facts, per-frame geometry and rescale, padding."""

    modality: str
    sop_class_uid: str
    geometry: tuple[FrameGeometry, ...]  # one per frame
    padding: tuple[float, float] | None  # inclusive stored-value range of padding


@dataclass(frozen=True)
class ParsedSlice:
    """A classic CT file (one frame, uncompressed little endian, grayscale) as discovery parsed it: its
    header and where its pixel values lie, so that reading it is a seek and a read."""

    header: ImageHeader
    pixel_offset: int  # byte offset of the PixelData element
    explicit_vr: bool
    rows: int
    columns: int
    dtype: str  # of the stored values, e.g. "<i2"
    bits_stored: int

    @property
    def element_bytes(self) -> int:
        """Bytes of the PixelData element before its values: tag, (VR, reserved,) value length."""
        return 12 if self.explicit_vr else 8

    @property
    def n_bytes(self) -> int:
        """Bytes of the pixel values the header announces (one frame)."""
        return self.rows * self.columns * np.dtype(self.dtype).itemsize


@dataclass
class _Instance:
    """One SOP instance as read: its file, what reading needs of its header, its stored pixel values
    (frames, rows, columns)."""

    path: Path
    header: ImageHeader
    frames: np.ndarray


def _parsed_slice(path: Path, header: Dataset, pixel_offset: int) -> ParsedSlice | None:
    """The :class:`ParsedSlice` of a classic CT file from its discovery ``header``; None for any other file
    (compressed, multi-frame, colour, or a header that reading would refuse: it is read in full later,
    which gives the reason)."""
    explicit_vr = _PLAIN_SYNTAXES.get(str(header.file_meta.get("TransferSyntaxUID", "")))
    if explicit_vr is None:
        return None
    try:
        rows, columns, bits_allocated, bits_stored, representation, samples = (
            _little_endian_us(header, keyword)
            for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")
        )
        if (
            _text_value(header, "NumberOfFrames") not in ("", "1")
            or samples not in (None, 1)
            or not rows
            or not columns
        ):
            return None
        bits_stored = bits_stored or bits_allocated
        if bits_allocated not in (8, 16, 32) or not 0 < bits_stored <= bits_allocated:
            return None
        return ParsedSlice(
            header=_image_header(path, header),
            pixel_offset=pixel_offset,
            explicit_vr=explicit_vr,
            rows=rows,
            columns=columns,
            dtype=f"<{'i' if representation == 1 else 'u'}{bits_allocated // 8}",
            bits_stored=bits_stored,
        )
    except (FileScanError, AttributeError, TypeError, ValueError, struct.error):
        return None


def _read_instance(path: Path, parsed: ParsedSlice | None, copies: list[Path], notes: list[str]) -> _Instance:
    """Read ``path`` (from where discovery found its pixel values when ``parsed``); when it cannot be
    read, the first readable of ``copies`` (noted in ``notes``)."""
    frames = _plain_frames(path, parsed) if parsed is not None else None
    if frames is not None:
        return _Instance(path=path, header=parsed.header, frames=frames)
    try:
        return _decoded(path)
    except FileScanError as error:
        for copy in copies:
            try:
                instance = _decoded(copy)
            except FileScanError:
                continue
            notes.append(f"an unreadable copy of a slice was set aside ({error.reason}); a readable copy was used")
            return instance
        raise


def _plain_frames(path: Path, parsed: ParsedSlice) -> np.ndarray | None:
    """The stored values (1, rows, columns) of a classic file at the PixelData element discovery found, or
    None when it is not there as found (a file changed or cut since): the file is then read in full."""
    try:
        with open(path, "rb") as handle:
            handle.seek(parsed.pixel_offset)
            element = handle.read(parsed.element_bytes)
            data = handle.read(parsed.n_bytes)
    except OSError:
        return None
    if len(element) < parsed.element_bytes or element[:4] != _PIXEL_DATA_TAG or len(data) < parsed.n_bytes:
        return None
    if parsed.explicit_vr and element[4:6] not in (b"OB", b"OW"):
        return None
    length = struct.unpack("<I", element[-4:])[0]
    if length < parsed.n_bytes or length == 0xFFFFFFFF:  # undefined length: encapsulated, not plain values
        return None
    values = _without_high_bits(np.frombuffer(data, dtype=np.dtype(parsed.dtype)), parsed.bits_stored)
    return values.reshape(1, parsed.rows, parsed.columns)


def _decoded(path: Path) -> _Instance:
    ds = _read_file(path)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise FileScanError(path, f"not a grayscale image (SamplesPerPixel {ds.SamplesPerPixel})")
    return _Instance(path=path, header=_image_header(path, ds), frames=_stored_frames(ds, path))


def _read_file(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise FileScanError(path, "not a DICOM file") from None
    except Exception as error:
        raise FileScanError(path, f"unreadable DICOM file ({scrubbed_reason(error)})") from None
    if "PixelData" not in ds:
        raise FileScanError(path, "no pixel data (or the file is truncated before it)")
    return ds


def _image_header(path: Path, ds: Dataset) -> ImageHeader:
    """The :class:`ImageHeader` of ``ds`` (a full header, or discovery's), frame by frame for enhanced CT."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    groups = [per_frame[index] if per_frame and index < len(per_frame) else None for index in range(n_frames)]
    return ImageHeader(
        modality=_text_value(ds, "Modality"),
        sop_class_uid=_text_value(ds, "SOPClassUID"),
        geometry=tuple(_frame_geometry(path, ds, group) for group in groups),
        padding=_padding_range(ds),
    )


def _check_ct_images(instances: list[_Instance], config: SelectionConfig) -> None:
    modalities = {instance.header.modality for instance in instances}
    if modalities != {config.modality}:
        raise ScanError(f"modality {'/'.join(sorted(m or 'missing' for m in modalities))} is not {config.modality}")
    classes = {instance.header.sop_class_uid for instance in instances}
    unknown = classes - set(CT_IMAGE_SOP_CLASSES)
    if unknown:
        names = ", ".join(sorted(UID(uid).name or "missing" for uid in unknown))
        raise ScanError(f"not a CT image (SOP class {_UID_PATTERN.sub('<uid>', names)})")


@dataclass
class _Slices:
    """Every frame of the series, in file order: stored pixel values and per-frame geometry (LPS)."""

    pixels: list[np.ndarray]  # one (rows, columns) array of stored values per frame
    orientation: np.ndarray  # (n, 6) IOP
    position: np.ndarray  # (n, 3) IPP, mm
    pixel_spacing: np.ndarray  # (n, 2) between rows, between columns, mm
    slope: np.ndarray  # (n,)
    intercept: np.ndarray  # (n,)
    padding: list[tuple[float, float] | None]  # inclusive stored-value range of padding, per frame

    def subset(self, keep: np.ndarray) -> "_Slices":
        """The frames at indices ``keep``, in that order."""
        return _Slices(
            pixels=[self.pixels[k] for k in keep],
            orientation=self.orientation[keep],
            position=self.position[keep],
            pixel_spacing=self.pixel_spacing[keep],
            slope=self.slope[keep],
            intercept=self.intercept[keep],
            padding=[self.padding[k] for k in keep],
        )


def _collect_slices(instances: list[_Instance]) -> _Slices:
    pixels, geometry, padding = [], [], []
    for instance in instances:
        if len(instance.header.geometry) != len(instance.frames):
            raise FileScanError(
                instance.path,
                f"{len(instance.frames)} frames decoded, {len(instance.header.geometry)} described by the header",
            )
        pixels.extend(instance.frames)
        geometry.extend(instance.header.geometry)
        padding.extend([instance.header.padding] * len(instance.frames))
    columns = list(zip(*geometry))
    return _Slices(
        pixels=pixels,
        orientation=np.array(columns[0]),
        position=np.array(columns[1]),
        pixel_spacing=np.array(columns[2]),
        slope=np.array(columns[3]),
        intercept=np.array(columns[4]),
        padding=padding,
    )


def _frame_geometry(path: Path, ds: Dataset, group: Dataset | None) -> FrameGeometry:
    """(IOP (6,), IPP (3,) mm, PixelSpacing (2,) mm, slope, intercept) of one frame: per-frame functional
    group first, then the shared group, then the classic top-level attributes."""
    iop = _text_values(_functional_item(ds, "PlaneOrientationSequence", group) or ds, "ImageOrientationPatient")
    ipp = _text_values(_functional_item(ds, "PlanePositionSequence", group) or ds, "ImagePositionPatient")
    pixel_spacing = _text_values(_functional_item(ds, "PixelMeasuresSequence", group) or ds, "PixelSpacing")
    transformation = _functional_item(ds, "PixelValueTransformationSequence", group) or ds
    if len(iop) != 6 or len(ipp) != 3:
        raise FileScanError(path, "no image position/orientation (not a volume slice)")
    if len(pixel_spacing) != 2 or min(float(v) for v in pixel_spacing) <= 0:
        raise FileScanError(path, "no valid PixelSpacing")
    return (
        tuple(float(v) for v in iop),
        tuple(float(v) for v in ipp),
        tuple(float(v) for v in pixel_spacing),
        _float_or_none(_text_value(transformation, "RescaleSlope")) or 1.0,
        _float_or_none(_text_value(transformation, "RescaleIntercept")) or 0.0,
    )


def _stored_frames(ds: Dataset, path: Path) -> np.ndarray:
    """The stored pixel values of ``ds`` as (frames, rows, columns) integers with the correct sign.

    Uncompressed little-endian data is viewed straight from the PixelData bytes; anything else goes
    through pydicom's pixel handlers (the default, permissively licensed plugins: pylibjpeg-openjpeg for
    JPEG 2000, pylibjpeg-rle for RLE, pyjpegls for JPEG-LS, python-gdcm for the JPEG processes). An image
    that would decode to more than 4 GiB is refused before any decoder allocates it.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
    decoded_bytes = rows * columns * n_frames * max(1, bits_allocated // 8)
    if decoded_bytes > _MAX_DECODED_BYTES:
        raise FileScanError(
            path,
            f"implausible image size: {rows}x{columns} pixels x {n_frames} frames would decode to "
            f"{decoded_bytes / 2**30:.1f} GiB (a corrupt or hostile header); not decoded",
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    if str(syntax) in _NATIVE_SYNTAXES and bits_allocated in (8, 16, 32):
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
        expected = rows * columns * n_frames
        data = ds.PixelData
        expected_bytes = expected * dtype.itemsize
        if len(data) < expected_bytes:
            raise FileScanError(path, f"pixel data is truncated ({len(data)} of {expected_bytes} bytes)")
        values = _without_high_bits(np.frombuffer(data, dtype=dtype, count=expected), bits_stored)
        return values.reshape(n_frames, rows, columns)
    try:
        array = ds.pixel_array
    except Exception as error:
        name = UID(str(syntax)).name or "missing"
        raise FileScanError(path, f"cannot decode transfer syntax {name}: {scrubbed_reason(error)}") from None
    return array.reshape(n_frames, rows, columns)


def _without_high_bits(values: np.ndarray, bits_stored: int) -> np.ndarray:
    """Stored integer ``values`` with the bits above BitsStored dropped (they may hold overlays) and the
    sign extended from the highest stored bit for a signed type."""
    shift = values.dtype.itemsize * 8 - bits_stored
    if shift <= 0:
        return values
    return (values << shift) >> shift if values.dtype.kind == "i" else values & ((1 << bits_stored) - 1)


def _padding_range(ds: Dataset) -> tuple[float, float] | None:
    """Stored values that mark padding (PixelPaddingValue, up to PixelPaddingRangeLimit), or None."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    # US/SS is ambiguous in implicit VR: a signed image's padding may have been decoded as unsigned
    value, limit = (int(v) - 65536 if signed and int(v) > 32767 else int(v) for v in (value, limit))
    return (min(value, limit), max(value, limit))


def _stack_slices(slices: _Slices, config: SelectionConfig, notes: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """Keep the main orientation, sort, deduplicate, check and space the slices; return HU (K, rows,
    columns), the RAS affine and the gantry tilt (degrees)."""
    slices = _main_orientation(slices, notes)
    _check_same_grid(slices)
    row_cosine, column_cosine = (v / np.linalg.norm(v) for v in (slices.orientation[0, :3], slices.orientation[0, 3:]))
    normal = np.cross(row_cosine, column_cosine)
    along_normal = slices.position @ normal  # mm
    order = np.argsort(along_normal, kind="stable")
    hu = _to_hu(slices, order)
    hu, positions, along_normal = _drop_duplicates(hu, slices.position[order], along_normal[order])
    if len(along_normal) < 2:
        raise ScanError("single slice: a volume needs at least 2 slice positions")
    stack_direction = _stack_direction(positions, along_normal, tolerance_mm=0.25 * slices.pixel_spacing[0].min())
    hu, slice_step = _evenly_spaced(hu, positions, along_normal, stack_direction, config)

    spacing_between_rows, spacing_between_columns = slices.pixel_spacing[0]
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * spacing_between_columns  # i runs along a row
    affine[:3, 1] = column_cosine * spacing_between_rows  # j runs down a column
    affine[:3, 2] = slice_step
    affine[:3, 3] = positions[0]
    affine[:2, :] *= -1  # LPS -> RAS
    return hu, affine, gantry_tilt_deg(slice_step, column_cosine, normal)


def _main_orientation(slices: _Slices, notes: list[str]) -> _Slices:
    """The frames in the orientation (IOP within 1e-3) that most frames share; the others are set aside
    with a note. Without such a majority (two stacks of equal size) the series is refused."""
    groups: list[list[int]] = []
    for index, orientation in enumerate(slices.orientation):
        group = next((g for g in groups if np.abs(slices.orientation[g[0]] - orientation).max() <= 1e-3), None)
        if group is None:
            groups.append([index])
        else:
            group.append(index)
    if len(groups) == 1:
        return slices
    main = max(groups, key=len)
    if 2 * len(main) <= len(slices.orientation):
        raise ScanError(
            f"mixed orientations in one series ({len(groups)} distinct ImageOrientationPatient, "
            f"none held by most of its {len(slices.orientation)} frames)"
        )
    notes.append(f"{len(slices.orientation) - len(main)} frames in another orientation set aside")
    return slices.subset(np.array(main))


def _check_same_grid(slices: _Slices) -> None:
    shapes = {frame.shape for frame in slices.pixels}
    if len(shapes) > 1:
        raise ScanError(
            f"slices of different sizes in one series: {' and '.join(f'{r}x{c}' for r, c in sorted(shapes))}"
        )
    if np.abs(slices.pixel_spacing - slices.pixel_spacing[0]).max() > 1e-4:
        raise ScanError("mixed pixel spacings in one series")


def _stack_direction(positions: np.ndarray, along_normal: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """The LPS direction (mm per mm along the normal) the slices advance in; they must lie on one line."""
    stack_direction = (positions[-1] - positions[0]) / (along_normal[-1] - along_normal[0])
    off_line = positions - (positions[0] + np.outer(along_normal - along_normal[0], stack_direction))
    if np.abs(off_line).max() > tolerance_mm:
        raise ScanError(f"slice positions do not lie on one line (off by {np.abs(off_line).max():.2f} mm)")
    return stack_direction


def _evenly_spaced(
    hu: np.ndarray,
    positions: np.ndarray,
    along_normal: np.ndarray,
    stack_direction: np.ndarray,
    config: SelectionConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """HU on evenly spaced slices, and the LPS step (mm) between them: uneven spacing is interpolated onto
    the median spacing; a gap above ``config.max_gap_ratio`` x the median is refused unless
    ``config.reject_gaps`` is False."""
    gaps = np.diff(along_normal)
    median_gap = float(np.median(gaps))
    widest = int(np.argmax(gaps))
    if gaps[widest] > config.max_gap_ratio * median_gap and config.reject_gaps:
        raise ScanError(
            f"gap of {gaps[widest]:.2f} mm at {along_normal[widest]:.1f} mm along the slice normal, "
            f"after slice {widest + 1} of {len(along_normal)} (median {median_gap:.2f} mm)"
        )
    if np.abs(gaps - median_gap).max() > 1e-3 * median_gap:
        return _interpolate_uniform(hu, along_normal - along_normal[0], median_gap), stack_direction * median_gap
    return hu, (positions[-1] - positions[0]) / (len(along_normal) - 1)


def gantry_tilt_deg(slice_step: np.ndarray, column_cosine: np.ndarray, normal: np.ndarray) -> float:
    """Gantry tilt (degrees) of a stack whose slices advance by ``slice_step`` (LPS mm).

    The angle between the stack direction and the slice normal, in the plane of the normal and the
    column direction. Positive when successive slices shift against the column direction (anterior in
    a standard axial series): the sign dcm2niix estimates from the slice vector.
    """
    angle = np.degrees(np.arctan2(-(slice_step @ column_cosine), abs(slice_step @ normal)))
    return round(float(angle), 4) + 0.0  # + 0.0 turns -0.0 into 0.0


def _to_hu(slices: _Slices, order: np.ndarray) -> np.ndarray:
    """HU (K, rows, columns) in ``order``: rescale per slice, padding and sub-air values to air.

    int16 when every slope is 1 and every intercept a whole number (nearly all CT: exact, and half the
    memory and time of float32); float32 otherwise.
    """
    rows, columns = slices.pixels[0].shape
    exact = all(float(slope) == 1.0 for slope in slices.slope) and all(float(b).is_integer() for b in slices.intercept)
    hu = np.empty((len(order), rows, columns), dtype=np.int16 if exact else np.float32)
    scratch = np.empty((rows, columns), dtype=np.int32 if exact else np.float32)
    for out_index, k in enumerate(order):
        stored = slices.pixels[k]
        if exact and slices.padding[k] is None:
            low, high = int(stored.min()), int(stored.max())
            intercept = int(slices.intercept[k])
            if -32768 <= low and high <= 32767 and -32768 <= low + intercept and high + intercept <= 32767:
                # The usual case: straight into int16 (no value can wrap), then air as the floor.
                np.add(stored, np.int16(intercept), out=hu[out_index], dtype=np.int16, casting="unsafe")
                if low + intercept < AIR_HU:
                    np.maximum(hu[out_index], np.int16(AIR_HU), out=hu[out_index])
                continue
        if exact:  # through int32, so that a sub-air padding value cannot wrap around in int16
            np.add(stored, np.int32(slices.intercept[k]), out=scratch, dtype=np.int32)
        else:
            np.multiply(stored, np.float32(slices.slope[k]), out=scratch, casting="unsafe")
            scratch += np.float32(slices.intercept[k])
        padding = slices.padding[k]
        if padding is not None:
            scratch[(stored >= padding[0]) & (stored <= padding[1])] = AIR_HU
        np.maximum(scratch, AIR_HU, out=scratch, casting="unsafe")
        if exact:
            np.minimum(scratch, np.iinfo(np.int16).max, out=scratch)
        hu[out_index] = scratch  # plain ufuncs and a copy: np.clip with a cast is several times slower
    return hu


def _drop_duplicates(hu: np.ndarray, positions: np.ndarray, along_normal: np.ndarray):
    """Remove repeated slice positions (within 0.01 mm) whose images are identical; reject differing ones."""
    repeated = np.flatnonzero(np.diff(along_normal) < 0.01) + 1
    if len(repeated) == 0:
        return hu, positions, along_normal
    for index in repeated:
        if not np.array_equal(hu[index], hu[index - 1]):
            raise ScanError(
                f"duplicate slice positions: different images at {along_normal[index]:.2f} mm along the slice normal"
            )
    keep = np.setdiff1d(np.arange(len(along_normal)), repeated)
    return hu[keep], positions[keep], along_normal[keep]


def _interpolate_uniform(hu: np.ndarray, offsets_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Linearly resample (K, rows, columns) slices at ``offsets_mm`` onto 0, spacing, 2 x spacing, ... mm."""
    n_out = int(np.floor(offsets_mm[-1] / spacing_mm + 1e-3)) + 1
    targets = np.arange(n_out) * spacing_mm
    lower = np.clip(np.searchsorted(offsets_mm, targets, side="right") - 1, 0, len(offsets_mm) - 2)
    weight = ((targets - offsets_mm[lower]) / (offsets_mm[lower + 1] - offsets_mm[lower])).astype(np.float32)
    out = np.empty((n_out,) + hu.shape[1:], dtype=np.float32)
    for m in range(n_out):
        np.multiply(hu[lower[m]], 1 - weight[m], out=out[m])
        out[m] += weight[m] * hu[lower[m] + 1]
    return out


# ------------------------------------------------------------------------------------------- helpers
def _text_values(ds: Dataset, keyword: str) -> list[str]:
    """The values of a text element of the default repertoire (CS, DS, IS, UI: ASCII by the standard),
    split at backslashes and stripped; [] when absent or empty.

    Taken from the bytes as read when pydicom has not converted the element yet: converting a value
    costs pydicom more than parsing the element, and every file's header goes through here.
    """
    element = ds.get_item(_tag(keyword))
    if element is None:
        return []
    if isinstance(element.value, bytes):
        text = element.value.decode("ascii", "replace").strip(" \x00")
        return [part.strip(" \x00") for part in text.split("\\")] if text else []
    return [str(value).strip() for value in _as_list(element.value)]


def _text_value(ds: Dataset, keyword: str) -> str:
    """The first value of :func:`_text_values`, "" when there is none."""
    values = _text_values(ds, keyword)
    return values[0] if values else ""


def _little_endian_us(ds: Dataset, keyword: str) -> int | None:
    """An unsigned short (US) of a little-endian file, from its two bytes as read; None when absent."""
    element = ds.get_item(_tag(keyword))
    if element is None:
        return None
    if isinstance(element.value, bytes):
        return struct.unpack("<H", element.value[:2])[0] if len(element.value) >= 2 else None
    return int(element.value)


@functools.cache
def _tag(keyword: str) -> Tag:
    """The tag of a DICOM keyword, looked up once."""
    return Tag(keyword)


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
