"""Dataset adapters: generic CSV, CQ500 reads.csv (majority of readers), RSNA per-slice CSV + DICOM headers."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fmct.datasets import load_labels, match_to_store, write_labels
from fmct.errors import InputError
from fmct.io.dicom import discover
from fmct.log import configure as configure_logging


def test_generic_csv_with_renaming_and_unknowns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("scan_id,PatientID,site,Hemorrhage,fracture\nabc,P1,A,1,\ndef,P1,A,no,TRUE\nghi,,B,0.0,0\n")
    labels = load_labels(str(path), rename={"PatientID": "patient_id", "Hemorrhage": "ich"})
    assert labels.findings == ["ich", "fracture"]
    assert [(r["scan_id"], r["patient_id"], r["ich"], r["fracture"]) for r in labels.rows] == [
        ("abc", "P1", 1, None),
        ("def", "P1", 0, 1),
        ("ghi", "", 0, 0),
    ]
    write_labels(labels, tmp_path / "out.csv")
    again = load_labels(str(tmp_path / "out.csv"))
    assert again.rows == labels.rows

    path.write_text("scan_id,ich\nabc,2\n")
    with pytest.raises(InputError, match=r"labels.csv:2 column ich: label '2'"):
        load_labels(str(path))
    path.write_text("name,ich\nabc,1\n")
    with pytest.raises(InputError, match="scan_id or source"):
        load_labels(str(path))
    with pytest.raises(InputError, match="no column 'Bleed'"):
        load_labels("generic:" + str(tmp_path / "out.csv"), rename={"Bleed": "ich"})


def test_an_unknown_finding_column_is_used_with_one_warning_naming_the_closest(tmp_path, capsys):
    configure_logging(0)  # as fmct's CLI does: the fmct logger's lines on stderr
    path = tmp_path / "labels.csv"
    path.write_text("scan_id,patient_id,ihc,sdh,my_finding\na,p1,1,0,1\nb,p2,0,1,0\n")
    labels = load_labels(str(path))
    assert labels.findings == ["ihc", "sdh", "my_finding"] and [row["ihc"] for row in labels.rows] == [1, 0]
    warnings = capsys.readouterr().err.splitlines()
    assert f"{path}: ihc: not a known finding; did you mean ich? (used as a finding of its own)" in warnings
    assert sum("my_finding: not a known finding; known findings: ich, iph" in line for line in warnings) == 1
    assert not any(line.startswith(f"{path}: sdh") for line in warnings) and len(warnings) == 2


def test_cq500_majority_of_three_readers_and_study_folders(tmp_path):
    findings = [
        "ICH",
        "IPH",
        "IVH",
        "SDH",
        "EDH",
        "SAH",
        "BleedLocation-Left",
        "Fracture",
        "MassEffect",
        "MidlineShift",
    ]
    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in findings]

    def reads(r1, r2, r3):  # each: the readers' ICH, SDH, Fracture votes; others 0
        cells = []
        for votes in (r1, r2, r3):
            values = dict.fromkeys(findings, "0")
            values["ICH"], values["SDH"], values["Fracture"] = map(str, votes)
            cells += [values[f] for f in findings]
        return cells

    rows = [
        ["CQ500-CT-0", "B1"] + reads((1, 1, 0), (1, 0, 0), (0, 0, 1)),  # ICH 2/3 yes, SDH 1/3, fracture 1/3
        ["CQ500-CT-12", "B2"] + reads((0, 0, 1), (0, 0, 1), (0, 0, 1)),
        ["CQ500-CT-427", "CQ500"] + reads((1, 1, 1), (1, 1, 0), (0, 1, 0)),
    ]
    (tmp_path / "reads.csv").write_text("\n".join(",".join(r) for r in [header] + rows) + "\n")
    (tmp_path / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 0.625mm").mkdir(parents=True)
    (tmp_path / "data" / "CQ500CT12").mkdir(parents=True)
    (tmp_path / "data" / "CQ500CT120").mkdir(parents=True)  # must not be mistaken for CQ500-CT-12

    labels = load_labels(str(tmp_path / "reads.csv"))  # detected by the R1: columns
    assert labels.findings == ["ich", "iph", "ivh", "sdh", "edh", "sah", "fracture", "mass", "midline_shift"]
    by_name = {r["patient_id"]: r for r in labels.rows}
    assert (by_name["CQ500-CT-0"]["ich"], by_name["CQ500-CT-0"]["sdh"], by_name["CQ500-CT-0"]["fracture"]) == (1, 0, 0)
    assert (by_name["CQ500-CT-12"]["ich"], by_name["CQ500-CT-12"]["fracture"]) == (0, 1)
    assert (by_name["CQ500-CT-427"]["ich"], by_name["CQ500-CT-427"]["sdh"]) == (1, 1)
    assert by_name["CQ500-CT-0"]["source"] == str(tmp_path / "CQ500CT0 CQ500CT0")
    assert by_name["CQ500-CT-12"]["source"] == str(tmp_path / "data" / "CQ500CT12")
    assert labels.notes == [f"1 of 3 studies have no folder under {tmp_path}"]

    # Every series ingest kept inside a study folder gets the study's labels.
    series = tmp_path / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 0.625mm"
    manifest = [  # ingest names a DICOM series "<folder>#<hash of its UID>"
        {"scan_id": "x1", "source": f"{series}#0123456789"},
        {"scan_id": "x2", "source": f"{tmp_path / 'data' / 'CQ500CT120'}#abcdef0123"},
    ]
    matched, unmatched = match_to_store(labels, manifest)
    assert [(r["scan_id"], r["ich"]) for r in matched] == [("x1", 1)] and unmatched == 2


def _write_slice(path, study, series, z, patient="anon"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = study, series, patient, "CT"
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((2, 2), np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_rsna_slices_grouped_into_series_and_studies(tmp_path):
    study_a, study_b = generate_uid(), generate_uid()
    series = {"a1": (study_a, generate_uid()), "a2": (study_a, generate_uid()), "b1": (study_b, generate_uid())}
    images = tmp_path / "stage_2_train"
    images.mkdir()
    lines = ["ID,Label"]
    for name, (study, uid) in series.items():
        for z in range(3):
            image = f"ID_{name}{z:02d}ff"
            _write_slice(images / f"{image}.dcm", study, uid, z)
            # Study A: one slice of series a2 has a subdural bleed; study B: nothing.
            bleed = int(name == "a2" and z == 1)
            for subtype in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
                lines.append(f"{image}_{subtype},{bleed if subtype in ('subdural', 'any') else 0}")
    lines.append("ID_missing00_any,1")  # a labelled slice without a file
    (tmp_path / "stage_2_train.csv").write_text("\n".join(lines) + "\n")
    (images / "notes.txt").write_text("not dicom")

    labels = load_labels("rsna:" + str(tmp_path / "stage_2_train.csv"))
    assert labels.findings == ["edh", "iph", "ivh", "sah", "sdh", "ich"]
    assert len(labels.rows) == 3  # one row per series
    assert labels.notes == [f"1 of 10 labelled slices have no DICOM file under {tmp_path}"]
    assert not any(uid in str(labels.rows) for _, uid in series.values())  # UIDs are not passed on

    # The scans ingest would store, named as its discovery names them; then match the labels to them.
    discovered, _ = discover([images])
    name_of_uid = {uid: name for name, (_, uid) in series.items()}
    manifest = [{"scan_id": f"scan_{name_of_uid[info.series_uid]}", "source": info.source} for info in discovered]
    matched, unmatched = match_to_store(labels, manifest)
    assert unmatched == 0
    by_scan = {r["scan_id"]: r for r in matched}
    assert by_scan["scan_a1"]["sdh"] == 1 and by_scan["scan_a1"]["ich"] == 1  # same study as a2's bleed
    assert by_scan["scan_a2"]["sdh"] == 1 and by_scan["scan_a2"]["edh"] == 0
    assert by_scan["scan_b1"]["ich"] == 0 and by_scan["scan_b1"]["sdh"] == 0
    assert pydicom.dcmread(images / "ID_a100ff.dcm").Modality == "CT"
