"""`fmct ingest` end to end: DICOM/NIfTI in, canonical store out; geometry, privacy, resume, bad inputs."""

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fmct.cli import main
from fmct.codec import read_volume
from fmct.config import IngestConfig, load_config
from fmct.ingest import ingest
from fmct.io.volume import Volume
from fmct.pseudonym import local_sources
from fmct.store import Store
from phantoms import BEADS, bead_positions, rotation, small_head, write_head

IDENTIFIERS = {
    "PatientName": "DOE^JANE",
    "PatientID": "PAT-93-4471",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC778899",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222",
}


GRID = ["canonical.shape=[48,48,48]", "canonical.spacing_mm=4.5"]  # small: these tests are about reasons


def quiet_config(**overrides) -> IngestConfig:
    return load_config(IngestConfig, None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize(
    "name, volume_args",
    [
        ("axial", dict(spacing=(1.6, 1.6, 3.0), shape=(140, 140, 64))),
        ("oblique20", dict(axes=rotation(0, 20.0), spacing=(1.6, 1.6, 3.0), shape=(140, 150, 70))),
        ("tilted15", dict(shear=np.tan(np.radians(15.0)), spacing=(1.6, 1.6, 3.0), shape=(140, 160, 64))),
    ],
)
def test_landmarks_through_dicom_and_store(tmp_path, name, volume_args):
    import SimpleITK as sitk

    volume = small_head(**volume_args)
    write_head(tmp_path / "dicom" / name, volume)
    summary = ingest([tmp_path / "dicom"], tmp_path / "store", IngestConfig(), progress=False)
    assert summary.stored == 1 and summary.skipped == 0
    store = Store(tmp_path / "store")
    hu, row = store[0]
    assert isinstance(hu, np.ndarray) and hu.dtype == np.int16 and hu.shape == (128, 128, 128)
    stored = Volume(hu=np.asarray(hu), affine=store.affine(0))
    error_mm = np.linalg.norm(bead_positions(stored) - BEADS, axis=1)
    assert error_mm.max() < 0.5, error_mm

    if name != "tilted15":  # SimpleITK ignores gantry tilt; for the others it is an independent reference
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom" / name)))
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z) index order
        lps = np.eye(4)
        lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
        lps[:3, 3] = image.GetOrigin()
        reference = Volume(hu=array.astype(np.float32), affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
        assert np.linalg.norm(bead_positions(reference) - bead_positions(stored), axis=1).max() < 0.5


def test_no_identifier_leaves_ingest(tmp_path, capsys):
    write_head(tmp_path / "in" / "good", **IDENTIFIERS)
    bad = dict(IDENTIFIERS, SeriesInstanceUID=IDENTIFIERS["SeriesInstanceUID"] + ".9", Modality="MR")
    write_head(tmp_path / "in" / "mr", **bad)
    assert main(["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "store")]) == 0
    printed = capsys.readouterr()
    texts = [printed.out, printed.err] + [
        p.read_bytes().decode("latin-1") for p in (tmp_path / "store").rglob("*") if p.is_file()
    ]
    for value in IDENTIFIERS.values():
        for text in texts:
            assert value not in text and value.replace("^", " ") not in text
    store = Store(tmp_path / "store")
    assert len(store) == 1 and len(store.errors()) == 1
    row = store.rows[0]
    assert len(row["scan_id"]) == 16 and len(row["patient_key"]) == 16 and row["patient_key"] != row["scan_id"]


def test_same_patient_same_key_across_runs_and_stores(tmp_path):
    write_head(tmp_path / "a" / "s1", PatientID="P1")
    write_head(tmp_path / "b" / "s2", PatientID="P1")
    ingest([tmp_path / "a"], tmp_path / "store", IngestConfig(), progress=False)
    ingest([tmp_path / "b"], tmp_path / "store", IngestConfig(), progress=False)
    ingest([tmp_path / "b"], tmp_path / "other_store", IngestConfig(), progress=False)
    rows = Store(tmp_path / "store").rows
    assert len(rows) == 2 and rows[0]["patient_key"] == rows[1]["patient_key"]
    assert rows[0]["study_key"] != rows[1]["study_key"]
    assert Store(tmp_path / "other_store").rows[0]["patient_key"] == rows[0]["patient_key"]  # one key, one patient key


def test_nifti_input(tmp_path):
    volume = small_head(spacing=(1.6, 1.6, 3.0), shape=(140, 140, 64))
    nib.save(nib.Nifti1Image(volume.hu.astype(np.int16), volume.affine), tmp_path / "head.nii.gz")
    summary = ingest([tmp_path / "head.nii.gz"], tmp_path / "store", IngestConfig(), progress=False)
    assert summary.stored == 1
    store = Store(tmp_path / "store")
    hu, row = store[0]
    assert local_sources()[row["source"]] == str(tmp_path / "head.nii.gz") and row["original_shape"] == [140, 140, 64]
    assert "head" not in row["source"]
    stored = Volume(hu=np.asarray(hu), affine=store.affine(0))
    assert np.linalg.norm(bead_positions(stored) - BEADS, axis=1).max() < 0.5


def test_series_selection_prefers_soft_kernel_thin_slices(tmp_path):
    study = dict(PatientID="P7", StudyInstanceUID="1.2.3.4.5.6.7")
    thin = small_head(spacing=(4.0, 4.0, 3.0), shape=(56, 56, 64))
    write_head(tmp_path / "in" / "thick_soft", ConvolutionKernel="H30s", SeriesInstanceUID="1.2.3.4.5.6.7.1", **study)
    write_head(
        tmp_path / "in" / "thin_bone", thin, ConvolutionKernel="H70h", SeriesInstanceUID="1.2.3.4.5.6.7.2", **study
    )
    write_head(
        tmp_path / "in" / "thin_soft", thin, ConvolutionKernel="H30s", SeriesInstanceUID="1.2.3.4.5.6.7.3", **study
    )
    ingest([tmp_path / "in"], tmp_path / "preferred", IngestConfig(), progress=False)
    rows = Store(tmp_path / "preferred").rows
    assert len(rows) == 1 and rows[0]["kernel"] == "H30s" and rows[0]["original_shape"][2] == 64
    ingest([tmp_path / "in"], tmp_path / "all", quiet_config(**{"selection.series": "all"}), progress=False)
    assert len(Store(tmp_path / "all")) == 3


def test_resume_after_kill_loses_nothing(tmp_path):
    for index in range(6):
        write_head(
            tmp_path / "in" / f"s{index}",
            small_head(spacing=(1.6, 1.6, 3.0), shape=(140, 140, 64)),
            PatientID=f"P{index}",
        )
    command = [sys.executable, "-m", "fmct.cli", "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "store")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "store" / "scans").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((tmp_path / "store" / "scans").glob("*.json")))
    assert 2 <= done_before < 6, "the kill should land mid-batch"
    volume_files = list((tmp_path / "store" / "scans").glob("*.b2nd"))
    assert len(volume_files) >= done_before
    for path in volume_files:  # every visible file is whole
        assert read_volume(path).shape == (128, 128, 128)
    summary = ingest([tmp_path / "in"], tmp_path / "store", IngestConfig(), progress=False)
    assert summary.already_stored == done_before and summary.stored == 6 - done_before
    store = Store(tmp_path / "store")
    assert len(store) == 6 and len({row["patient_key"] for row in store.rows}) == 6
    again = ingest([tmp_path / "in"], tmp_path / "store", IngestConfig(), progress=False)
    assert again.stored == 0 and again.already_stored == 6


def test_two_workers_give_the_same_store(tmp_path):
    for index in range(3):
        write_head(tmp_path / "in" / f"s{index}", PatientID=f"P{index}")
    config = IngestConfig()
    ingest([tmp_path / "in"], tmp_path / "one", config, workers=1, progress=False)
    ingest([tmp_path / "in"], tmp_path / "two", config, workers=2, progress=False)
    one, two = Store(tmp_path / "one"), Store(tmp_path / "two")
    assert one.scan_ids == two.scan_ids and len(one) == 3
    for scan_id in one.scan_ids:
        assert np.array_equal(one[scan_id][0], two[scan_id][0])


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # a usage error leaves nothing behind
    (tmp_path / "in").mkdir()
    assert main(["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "canonical.spacing=2"]) == 2
    assert "unknown config key canonical.spacing" in capsys.readouterr().err


def test_folders_named_by_uid_do_not_leak_it(tmp_path):
    uid_folder = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    write_head(tmp_path / "in" / uid_folder / "series", PatientID="P1")
    ingest([tmp_path / "in"], tmp_path / "store", IngestConfig(), progress=False)
    source = Store(tmp_path / "store").rows[0]["source"]
    assert uid_folder not in source and len(source) == 16
    assert local_sources()[source].startswith(str(tmp_path / "in" / uid_folder / "series") + "#")  # found again locally


def test_synth_labels_match_the_store_from_any_working_directory(tmp_path, monkeypatch):
    from fmct.datasets import load_labels, match_to_store
    from fmct.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", n=3, sites=("A",), fmt="dicom", matrix=128)
    monkeypatch.chdir(tmp_path)
    ingest(["cohort/dicom"], tmp_path / "store", IngestConfig(), progress=False)
    monkeypatch.chdir(tmp_path / "cohort")  # somewhere else entirely
    matched, unmatched = match_to_store(
        load_labels(str(tmp_path / "cohort" / "labels.csv")), Store(tmp_path / "store").rows
    )
    assert unmatched == 0 and len({row["scan_id"] for row in matched}) == 3


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom's own warning on the bad value we wrote
def test_a_malformed_header_value_is_a_reason_not_a_crash(tmp_path):
    write_head(tmp_path / "in" / "good", PatientID="G")
    files = write_head(tmp_path / "in" / "odd", PatientID="O")
    dataset = pydicom.dcmread(files[0])
    tag = pydicom.tag.Tag("NumberOfFrames")  # "1A", as in one of pydicom's own test files: not a number
    dataset._dict[tag] = pydicom.dataelem.RawDataElement(tag, "IS", 2, b"1A", 0, False, True)
    dataset.save_as(files[0])
    summary = ingest([tmp_path / "in"], tmp_path / "store", IngestConfig(), progress=False)
    assert summary.stored == 1
    (error,) = Store(tmp_path / "store").errors()
    assert "odd" in local_sources()[error["source"]] and "unreadable DICOM header" in error["reason"]


# ------------------------------------------------------------------ reasons that say what happened
def test_a_folder_that_cannot_be_listed_is_named_with_permission_denied(tmp_path, monkeypatch):
    write_head(tmp_path / "in" / "good", PatientID="G")
    write_head(tmp_path / "in" / "locked_Doe_Jane", PatientID="L")  # a subfolder the walk cannot enter
    (tmp_path / "locked_Smith").mkdir()  # a source folder that cannot be listed
    listing = os.scandir

    def scandir(path="."):  # as chmod 000 does for anyone but root (tests may run as root)
        if Path(path).name.startswith("locked"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = ingest(
        [tmp_path / "in", tmp_path / "locked_Smith"],
        tmp_path / "store",
        load_config(IngestConfig, None, GRID),
        progress=False,
    )
    assert (summary.stored, summary.skipped) == (1, 2)
    real = local_sources()
    reasons = {real[error["source"]]: error["reason"] for error in Store(tmp_path / "store").errors()}
    for folder in (tmp_path / "in" / "locked_Doe_Jane", tmp_path / "locked_Smith"):
        name = next(name for name, path in real.items() if path == str(folder))
        assert reasons[str(folder)] == f"folder {name}: cannot list its files (permission denied)"
    assert "Doe" not in (tmp_path / "store" / "errors.csv").read_text()


def test_a_lone_truncated_slice_says_it_is_truncated(tmp_path):
    """pydicom-data's 693_UNCI.dcm (a CQ500 head CT slice) cut in half: the series of its one slice is
    rejected for its size, and the reason says why it is that small."""
    data = Path(get_testdata_file("693_UNCI.dcm")).read_bytes()
    (tmp_path / "in").mkdir()
    cut = tmp_path / "in" / "Doe_Jane.dcm"
    cut.write_bytes(data[: len(data) // 2])
    summary = ingest([cut], tmp_path / "store", load_config(IngestConfig, None, GRID), progress=False)
    (error,) = Store(tmp_path / "store").errors()
    match = re.fullmatch(
        r"1 slices, fewer than min_slices 20; its folder holds 1 unreadable DICOM files, such as file "
        r"([0-9a-f]{16}) \(pixel data is truncated \(\d+ of 524288 bytes\)\)",
        error["reason"],
    )
    assert match, error["reason"]
    assert local_sources()[match.group(1)] == str(cut) and summary.skipped == 1
    assert "Doe" not in (tmp_path / "store" / "errors.csv").read_text()


def test_the_skipped_count_is_the_rows_of_errors_csv(tmp_path, capsys):
    """A file given as a source that is no scan has one reason, its own, not a second "nothing found here"
    that would overwrite it in errors.csv and be counted twice."""
    write_head(tmp_path / "in" / "good", PatientID="G")
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    sources = [tmp_path / "in", tmp_path / "notes.txt", tmp_path / "empty.dcm", tmp_path / "nothing"]
    assert main(["ingest", *map(str, sources), "--out", str(tmp_path / "store"), *GRID]) == 0
    with open(tmp_path / "store" / "errors.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert f"skipped {len(rows)} inputs (+0 from earlier runs" in capsys.readouterr().out and len(rows) == 3
    assert sorted(row["reason"] for row in rows) == [
        "empty file (0 bytes)",
        "neither DICOM (no 'DICM' marker at byte 128) nor NIfTI (.nii, .nii.gz)",
        "no DICOM series or NIfTI file found here",
    ]
