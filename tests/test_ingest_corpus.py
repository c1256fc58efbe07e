"""The bad-input corpus: 40 kinds of bad or awkward input, built here, in ONE ingest run beside good
series. Every kind gets its own fitting one-line reason (or, for a series that keeps its main stack, a
note), the batch goes on through a worker that aborts, and every good series is stored byte for byte as
a clean ingest of the good series alone stores it."""

from __future__ import annotations

import csv
import faulthandler
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import fmct.scans.job
from fmct.config import IngestConfig, load_config
from fmct.ingest import ingest
from fmct.io.dicom_write import write_series
from fmct.pseudonym import local_sources
from fmct.store import Store
from phantoms import small_head, write_head

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="the aborting worker inherits the test's hook by fork"
)

# A small grid keeps the run short; the good series are checked against a clean ingest on the same grid.
GRID = ["canonical.shape=[48,48,48]", "canonical.spacing_mm=4.5"]
PSEUDONYM = r"[0-9a-f]{16}"


def edit(paths, **tags) -> None:
    """Set DICOM ``tags`` (keyword=value, None deletes) on every file of ``paths``."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def encapsulated(path: Path, syntax: str, fragment: bytes, **tags) -> None:
    """Rewrite ``path`` with compressed ``syntax`` and one pixel ``fragment`` (which need not decode)."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def save_nifti(path: Path, data: np.ndarray, affine=np.diag([4.0, 4.0, 6.0, 1.0])) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


# --------------------------------------------------------------------------------- the bad inputs
def build_bad(bad: Path) -> dict[str, str]:
    """Write one input of each bad kind under ``bad/<kind>``; return {kind: regex its reason must match}."""
    expected = {}

    def series(kind: str, volume=None, **tags) -> list[Path]:
        return write_head(bad / kind, volume, PatientID=f"P-{kind}", **tags)

    files = series("truncated_slice")
    files[10].write_bytes(files[10].read_bytes()[:-3000])
    expected["truncated_slice"] = rf"^file {PSEUDONYM}: pixel data is truncated \(\d+ of 6272 bytes\)$"
    edit(series("no_pixel_data"), PixelData=None)
    expected["no_pixel_data"] = rf"^file {PSEUDONYM}: no pixel data"
    series("mr_modality", Modality="MR")
    expected["mr_modality"] = r"^modality MR is not CT$"
    series("secondary_capture", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    expected["secondary_capture"] = r"^not a CT image series \(SOP class Secondary Capture Image Storage\)$"
    series("scout_series", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    expected["scout_series"] = r"^localizer/scout \(ImageType LOCALIZER\)$"
    series("too_few_slices", small_head(shape=(56, 56, 10), spacing=(4.0, 4.0, 6.0)))
    expected["too_few_slices"] = r"^10 slices, fewer than min_slices 20$"
    one = small_head()
    write_series(bad / "single_slice", one.hu[:, :, 16:17], one.affine, tags={"PatientID": "P-single"})
    expected["single_slice"] = r"^1 slices, fewer than min_slices 20$"
    series("thick_slices", small_head(shape=(56, 56, 24), spacing=(4.0, 4.0, 8.0)))
    expected["thick_slices"] = r"^slice thickness 8 mm outside 0\.4\.\.6 mm$"
    sagittal = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])  # i -> A... slices stacked along x
    series("sagittal_series", small_head(axes=sagittal, shape=(48, 32, 36), spacing=(4.0, 6.0, 4.0)))
    expected["sagittal_series"] = r"^not axial: slice normal 90 degrees from the S-I axis$"
    files = series("mixed_orientation_even")
    edit(files[::2], ImageOrientationPatient=[1, 0, 0, 0, 0.9397, -0.3420])
    expected["mixed_orientation_even"] = (
        r"^mixed orientations in one series \(2 distinct ImageOrientationPatient, none held by most"
    )
    files = series("different_image_same_place")
    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(bad / "different_image_same_place" / "extra.dcm")
    expected["different_image_same_place"] = r"^duplicate slice positions: different images at -?\d+\.\d\d mm"
    series("missing_slice")[12].unlink()
    expected["missing_slice"] = (
        r"^gap of 12\.00 mm at -?\d+\.\d mm along the slice normal, after slice 12 of 31 \(median 6\.00 mm\)$"
    )
    files = series("header_cut_in_folder")
    files[12].write_bytes(files[12].read_bytes()[:300])
    expected["header_cut_in_folder"] = (
        rf"^gap of 12\.00 mm .*; its folder holds 1 unreadable DICOM files, such as file {PSEUDONYM} "
        r"\(unreadable DICOM header: .*\)$"
    )
    expected["header_cut_in_folder/IM00013.dcm"] = r"^unreadable DICOM header: "
    for path in series("undecodable"):
        encapsulated(path, "1.2.840.10008.1.2.4.100", b"\x00garbage" * 64)  # MPEG-2: no decoder for it
    expected["undecodable"] = rf"^file {PSEUDONYM}: cannot decode transfer syntax MPEG2 Main Profile / Main Level: "
    files = series("decoder_bomb")
    encapsulated(files[0], pydicom.uid.RLELossless, bytes(64), Rows=65535, Columns=65535)
    expected["decoder_bomb"] = (
        rf"^file {PSEUDONYM}: implausible image size: 65535x65535 pixels x 1 frames would decode to 8\.0 GiB"
    )
    files = series("malformed_header_value")
    ds = pydicom.dcmread(files[0])
    tag = pydicom.tag.Tag("NumberOfFrames")  # "1A", as in one of pydicom's own test files: not a number
    ds._dict[tag] = pydicom.dataelem.RawDataElement(tag, "IS", 2, b"1A", 0, False, True)
    ds.save_as(files[0])
    expected["malformed_header_value"] = r"^unreadable DICOM header: invalid literal for int"
    files = series("no_series_uid", small_head(shape=(56, 56, 20)))
    edit(files[:1], SeriesInstanceUID=None)
    expected["no_series_uid/IM00001.dcm"] = r"^unreadable DICOM header: no SeriesInstanceUID"
    expected["no_series_uid"] = (
        rf"^(gap of 12\.00 mm .*|19 slices, fewer than min_slices 20); its folder holds 1 unreadable "
        rf"DICOM files, such as file {PSEUDONYM} \(unreadable DICOM header: no SeriesInstanceUID"
    )
    files = series("rgb")
    ds = pydicom.dcmread(files[3])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    ds.save_as(files[3])
    expected["rgb"] = rf"^file {PSEUDONYM}: not a grayscale image \(SamplesPerPixel 3\)$"
    edit(series("no_position")[4:5], ImagePositionPatient=None)
    expected["no_position"] = rf"^file {PSEUDONYM}: no image position/orientation \(not a volume slice\)$"
    edit(series("no_pixel_spacing")[2:3], PixelSpacing=None)
    expected["no_pixel_spacing"] = rf"^file {PSEUDONYM}: no valid PixelSpacing$"
    files = series("off_line")
    ds = pydicom.dcmread(files[7])
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 10, *ds.ImagePositionPatient[1:]]
    ds.save_as(files[7])
    expected["off_line"] = r"^slice positions do not lie on one line \(off by "
    files = series("mixed_sizes")
    ds = pydicom.dcmread(files[9])
    ds.Rows = ds.Columns = 40
    ds.PixelData = bytes(40 * 40 * 2)
    ds.save_as(files[9])
    expected["mixed_sizes"] = r"^slices of different sizes in one series: 40x40 and 56x56$"
    edit(series("mixed_pixel_spacing")[6:7], PixelSpacing=[3.5, 3.5])
    expected["mixed_pixel_spacing"] = r"^mixed pixel spacings in one series$"
    no_air = small_head()
    no_air.hu[:] = 40.0
    series("no_air", no_air)
    expected["no_air"] = r"^not CT in HU: under 1% of voxels are air"
    series("worker_abort", SeriesDescription="ABORT ME")
    expected["worker_abort"] = (
        r"^the worker process reading this scan died \(killed by SIGABRT\): a crash in native code "
        r"such as an image decoder, or out of memory; the batch went on without it"
    )
    return expected | build_bad_files(bad)


def build_bad_files(bad: Path) -> dict[str, str]:
    """Files that are no scan at all, and broken NIfTI files."""
    expected = {}
    (bad / "files").mkdir()
    (bad / "files" / "zero_bytes.dcm").write_bytes(b"")
    expected["files/zero_bytes.dcm"] = r"^empty file \(0 bytes\)$"
    (bad / "files" / "notes.txt").write_text("not a scan")
    expected["files/notes.txt"] = r"^neither DICOM \(no 'DICM' marker at byte 128\) nor NIfTI \(\.nii, \.nii\.gz\)$"
    (bad / "files" / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    expected["files/picture.png"] = r"^neither DICOM"
    (bad / "files" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))
    expected["files/DICOMDIR"] = r"^a DICOMDIR \(the index of a DICOM medium\), not an image$"
    formula_name = '=HYPERLINK("http:x")+cmd.dcm'  # a spreadsheet formula for a file name
    (bad / "files" / formula_name).write_bytes(b"=1+1")
    expected[f"files/{formula_name}"] = r"^neither DICOM"
    raw = pydicom.dcmread(write_head(bad / "files" / "tmp")[0])
    shutil.rmtree(bad / "files" / "tmp")
    raw.preamble = None
    pydicom.dcmwrite(bad / "files" / "no_preamble.dcm", raw, enforce_file_format=False)  # ACR-NEMA style, no "DICM"
    expected["files/no_preamble.dcm"] = r"^neither DICOM"
    (bad / "nifti").mkdir()
    (bad / "nifti" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage, not gzip")
    expected["nifti/broken.nii.gz"] = r"^unreadable NIfTI \("
    head = small_head().hu.astype(np.float32)
    with_nan = head.copy()
    with_nan[3, 3, 3] = np.nan
    save_nifti(bad / "nifti" / "nan.nii.gz", with_nan)
    expected["nifti/nan.nii.gz"] = r"^1 NaN/inf voxels$"
    save_nifti(bad / "nifti" / "four_d.nii.gz", np.stack([head, head], axis=-1))
    expected["nifti/four_d.nii.gz"] = r"^4D image \(shape \(56, 56, 32, 2\)\), only 3D volumes are supported$"
    save_nifti(bad / "nifti" / "two_d.nii", head[:, :, 0])
    expected["nifti/two_d.nii"] = r"^2D image \(shape \(56, 56\)\), a CT volume needs 3 dimensions$"
    save_nifti(bad / "nifti" / "cut.nii", head)
    data = (bad / "nifti" / "cut.nii").read_bytes()
    (bad / "nifti" / "cut.nii").write_bytes(data[: len(data) // 2])
    expected["nifti/cut.nii"] = r"^unreadable NIfTI voxel data \("
    save_nifti(bad / "nifti" / "label_map.nii.gz", (head > 0).astype(np.uint8))
    expected["nifti/label_map.nii.gz"] = r"^not CT in HU: under 1% of voxels are air"
    return expected


# -------------------------------------------------------------------------------- the good inputs
def build_good(good: Path) -> None:
    """Good series that must be stored exactly as a clean ingest stores them."""
    write_head(good / "plain", PatientID="P-good-1")
    study = generate_uid()
    write_head(good / "study" / "soft", PatientID="P-good-2", StudyInstanceUID=study, ConvolutionKernel="H30s")
    write_head(
        good / "formula_manufacturer", PatientID="P-good-3", Manufacturer="=1+1", ManufacturerModelName="@SUM(A1)"
    )
    head = small_head()
    write_series(good / "jpeg2000", head.hu, head.affine, tags={"PatientID": "P-good-4"}, transfer_syntax="jpeg2000")
    write_series(good / "rle", head.hu, head.affine, tags={"PatientID": "P-good-5"}, transfer_syntax="rle")
    (good / "nifti").mkdir()
    save_nifti(good / "nifti" / "head.nii.gz", head.hu.astype(np.int16))


def build_bone_twin(bad: Path, good: Path) -> dict[str, str]:
    """A bone-kernel series of the good soft series' study: the soft one is preferred."""
    study = pydicom.dcmread(next((good / "study" / "soft").iterdir())).StudyInstanceUID
    write_head(bad / "bone_twin", PatientID="P-good-2", StudyInstanceUID=study, ConvolutionKernel="H70h")
    return {"bone_twin": r"^another series of the study is preferred: \[soft kernel 'H30s'.*over \[bone kernel 'H70h'"}


def build_recovered(corpus: Path, clean: Path) -> dict[str, str]:
    """Series with something odd filed with them, which keep their main stack; a clean twin of each (same
    UIDs, without the oddity) under ``clean``. Returns {kind: the note its manifest row must carry}."""
    notes = {}
    for kind in ("stray_truncated_copy", "localizer_inside", "off_orientation_frame", "identical_copy"):
        files = write_head(corpus / "recovered" / kind, PatientID=f"P-{kind}")
        shutil.copytree(corpus / "recovered" / kind, clean / kind)
        if kind == "stray_truncated_copy":  # a truncated copy of slice 4, same SOPInstanceUID, far away
            (corpus / "misc" / "copies").mkdir(parents=True)
            (corpus / "misc" / "copies" / "IM00004.dcm").write_bytes(files[3].read_bytes()[:-2000])
            notes[kind] = "1 duplicate files of slices (same SOPInstanceUID) not used"
        elif kind == "identical_copy":
            (corpus / "misc" / "again").mkdir(parents=True)
            shutil.copy(files[8], corpus / "misc" / "again" / "IM00009.dcm")
            notes[kind] = "1 duplicate files of slices (same SOPInstanceUID) not used"
        else:
            ds = pydicom.dcmread(files[0])
            ds.SOPInstanceUID = generate_uid()
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            if kind == "localizer_inside":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.save_as(corpus / "recovered" / kind / "AAA_extra.dcm")
            notes[kind] = (
                "1 localizer images set aside"
                if kind == "localizer_inside"
                else "1 frames in another orientation set aside"
            )
    return notes


# -------------------------------------------------------------------------------------------- test
def aborting_read_series(original):
    """The series reader, except that a series described "ABORT ME" aborts its process natively."""

    def read(info, config=None):
        if info.series_description == "ABORT ME":
            faulthandler.disable()  # pytest's handler would print this worker's stack; the abort is the point
            os.abort()
        return original(info, config)

    return read


@pytest.mark.filterwarnings(
    "ignore:Invalid value for VR IS"
)  # pydicom's own warning on the bad value written on purpose
def test_bad_input_corpus_in_one_run_beside_good_series(tmp_path, monkeypatch):
    corpus, clean = tmp_path / "corpus", tmp_path / "clean"
    build_good(corpus / "good")
    expected = build_bad(corpus / "bad") | build_bone_twin(corpus / "bad", corpus / "good")
    notes = build_recovered(corpus, clean)
    (tmp_path / "empty_source").mkdir()
    expected["empty_source"] = r"^no DICOM series or NIfTI file found here$"
    # kinds of bad or awkward input; a cut header in a series folder gives two rows, one kind (+1: a formula
    # in a header value, stored with its CSV cell neutralised)
    kinds = [kind for kind in expected if kind not in ("header_cut_in_folder/IM00013.dcm", "no_series_uid/IM00001.dcm")]
    assert len(kinds) + len(notes) + 1 >= 40

    config = load_config(IngestConfig, None, GRID)
    monkeypatch.setattr(fmct.scans.job, "read_series", aborting_read_series(fmct.scans.job.read_series))
    summary = ingest([corpus, tmp_path / "empty_source"], tmp_path / "store", config, workers=2, progress=False)
    store = Store(tmp_path / "store")
    real = local_sources()

    # every kind: exactly the rows it should have, each a fitting one-line reason
    rows = [dict(error, path=real[error["source"]]) for error in store.errors()]
    for kind, pattern in expected.items():
        where = str(tmp_path / kind) if kind == "empty_source" else str(corpus / "bad" / kind)
        # a file or a source is named by its path, a series by its folder, "#", a hash of its UID
        found = [row for row in rows if row["path"] == where or row["path"].startswith(where + "#")]
        assert len(found) == 1, (kind, [(Path(r["path"]).name, r["reason"]) for r in found])
        assert re.search(pattern, found[0]["reason"]), (kind, found[0]["reason"])
    assert len(rows) == len(expected) == summary.skipped
    assert all("\n" not in row["reason"] and not row["reason"].startswith(("=", "+", "-", "@")) for row in rows)

    # the good and the recovered series are stored, and nothing else
    by_path = {real[row["source"]]: row for row in store.rows}
    assert len(store) == summary.stored == 6 + len(notes)
    for kind, note in notes.items():
        (row,) = [row for path, row in by_path.items() if path.startswith(str(corpus / "recovered" / kind) + "#")]
        assert row["notes"] == note
    _assert_same_as_a_clean_ingest(tmp_path, corpus, clean, config, store, by_path)
    _assert_no_formula_cells(tmp_path / "store")

    # a re-run reads nothing again: the aborting scan is remembered as failed, not retried forever
    again = ingest([corpus, tmp_path / "empty_source"], tmp_path / "store", config, workers=2, progress=False)
    assert (again.stored, again.already_stored) == (0, len(store))
    assert again.skipped + again.skipped_before == len(rows) and again.skipped_before >= 20


def _assert_same_as_a_clean_ingest(tmp_path, corpus, clean, config, store, by_path) -> None:
    """Good series: volume file and manifest row byte-identical to a clean ingest of them alone (same
    paths, same key); recovered series: volume file byte-identical to a clean twin without the oddity."""
    good_sources = [
        corpus / "good" / name for name in ("plain", "study", "formula_manufacturer", "jpeg2000", "rle", "nifti")
    ]
    ingest(good_sources, tmp_path / "clean_store", config, progress=False)
    ingest([clean], tmp_path / "clean_twins", config, progress=False)
    good_store, twins = Store(tmp_path / "clean_store"), Store(tmp_path / "clean_twins")
    assert len(good_store) == 6 and len(twins) == 4
    for scan_id in good_store.scan_ids:
        assert store.scan_file(scan_id).read_bytes() == good_store.scan_file(scan_id).read_bytes(), scan_id
        assert (tmp_path / "store" / "scans" / f"{scan_id}.json").read_bytes() == (
            tmp_path / "clean_store" / "scans" / f"{scan_id}.json"
        ).read_bytes(), scan_id
    for scan_id in twins.scan_ids:
        assert store.scan_file(scan_id).read_bytes() == twins.scan_file(scan_id).read_bytes(), scan_id
    assert set(good_store.scan_ids) | set(twins.scan_ids) == set(store.scan_ids)
    formula_row = next(row for path, row in by_path.items() if "formula_manufacturer" in path)
    stored_row = json.loads((tmp_path / "store" / "scans" / f"{formula_row['scan_id']}.json").read_text())
    assert stored_row["manufacturer"] == "=1+1"  # kept as it is; only its CSV cell is neutralised


def _assert_no_formula_cells(store_path: Path) -> None:
    for table in ("manifest.csv", "errors.csv"):
        with open(store_path / table, newline="") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) or re.match(r"^-[^\d]", cell) for cell in cells), (
            table
        )
    manifest = (store_path / "manifest.csv").read_text()
    assert "'=1+1" in manifest and "'@SUM(A1)" in manifest
