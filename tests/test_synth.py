"""fmct synth: tissue densities, exact labels, midline shift, DICOM geometry, determinism, learnability."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pydicom
import pytest

from fmct.cli import main
from fmct.io import read_series
from fmct.synth import BITS, FINDINGS, Subject, generate_cohort, make_subject
from fmct.synth.acquisition import ScannerGrid, reconstruct
from fmct.synth.anatomy import head_template
from fmct.synth.subject import PRIMARY_FINDINGS

MATRIX = 96  # small images, same field of view: 2.4-2.7 mm pixels


@pytest.fixture(scope="module")
def normal_subject() -> Subject:
    return Subject(11, "A", findings=())


def _falx_head_x(scan) -> np.ndarray:
    """x (mm) in the head frame of every falx voxel: its distance from the undisplaced midline plane."""
    voxels = np.stack(np.nonzero(scan.mask("falx"))).astype(np.float64)
    world = scan.affine[:3, :3] @ voxels + scan.affine[:3, 3, None]
    return scan.head_from_world[0, :3] @ world + scan.head_from_world[0, 3]


def test_tissue_densities_match_head_ct(normal_subject):
    template = head_template()
    hu = normal_subject.hu
    grey = hu[(template.gm > 0.9) & (template.csf < 0.05)]
    white = hu[(template.wm > 0.9) & (template.csf < 0.05)]
    ventricle = hu[template.ventricle > 0.95]
    skull = hu[(np.abs(template.outside_mm - 1.5) < 0.1) & (template.coords[2] > 30)]  # first voxel of bone
    outside = hu[(template.outside_mm > 40) & (template.coords[2] > 60)]
    assert 35 <= np.median(grey) <= 45
    assert 20 <= np.median(white) <= 30
    assert np.median(grey) - np.median(white) >= 6  # grey-white differentiation
    assert -5 <= np.median(ventricle) <= 15
    assert np.median(skull) >= 1000  # the inner table of the vault
    assert np.all(outside <= -990)  # air above the scalp


def test_noise_matches_the_acquisition(normal_subject):
    for series in ("routine", "bone"):
        acquisition = normal_subject.acquisition(series, matrix=128)
        grid = ScannerGrid.for_acquisition(acquisition)
        noise_only = reconstruct(grid, np.zeros(grid.shape, np.float32), np.random.default_rng(0))
        assert abs(noise_only.std() - acquisition.noise_hu) < 0.05 * acquisition.noise_hu
        assert abs(noise_only.mean() - acquisition.hu_offset) < 0.3


def test_scan_geometry_and_brain_hu(normal_subject):
    acquisition = normal_subject.acquisition("routine", matrix=MATRIX)
    scan = normal_subject.scan(acquisition)
    assert scan.hu.shape == (MATRIX, MATRIX, acquisition.n_slices)
    assert 140 <= acquisition.n_slices * acquisition.thickness_mm <= 230  # skull base to vertex, mm
    assert np.allclose(scan.volume().spacing_mm, [acquisition.pixel_mm] * 2 + [acquisition.thickness_mm])
    middle = scan.hu[MATRIX // 2 - 4 : MATRIX // 2 + 4, MATRIX // 2 - 4 : MATRIX // 2 + 4, acquisition.n_slices // 2]
    assert 15 <= np.median(middle) <= 45  # brain in the middle of the field of view
    assert not any(scan.labels.values()) and not (scan.bits & ~np.uint16(BITS["falx"])).any()


@pytest.mark.parametrize("finding", PRIMARY_FINDINGS)
def test_label_is_one_exactly_when_mask_has_voxels(finding):
    scan = make_subject(100 + PRIMARY_FINDINGS.index(finding), "B", findings=(finding,), severity=0.6, matrix=MATRIX)
    assert scan.labels[finding] == 1
    for name in FINDINGS:
        assert scan.labels[name] == int(scan.mask(name).any()), name
    haemorrhage = any(scan.labels[f] for f in ("iph", "ivh", "sdh", "edh", "sah"))
    assert scan.labels["ich"] == int(haemorrhage)
    assert np.array_equal(
        scan.mask("ich"), scan.mask("iph") | scan.mask("ivh") | scan.mask("sdh") | scan.mask("edh") | scan.mask("sah")
    )
    present = sorted(f for f in PRIMARY_FINDINGS if scan.labels[f])
    assert set(present) <= {finding, "fracture"}  # nothing else appears by accident


def test_subtle_findings_are_smaller_than_obvious_ones():
    for finding in ("sdh", "iph", "infarct"):
        subtle = make_subject(7, "A", findings=(finding,), severity=0.05, matrix=MATRIX)
        obvious = make_subject(7, "A", findings=(finding,), severity=0.95, matrix=MATRIX)
        assert 0 < subtle.mask(finding).sum() * 4 < obvious.mask(finding).sum(), finding


def test_haematoma_is_hyperdense_and_infarct_hypodense():
    sdh = Subject(5, "A", findings=("sdh",), severity=0.8)
    infarct = Subject(5, "A", findings=("infarct",), severity=0.8)
    template = head_template()
    brain = (template.gm + template.wm > 0.9) & ((infarct.bits & BITS["infarct"]) == 0)
    blood = sdh.hu[(sdh.bits & BITS["sdh"]) != 0]
    if sdh.lesions[0].subtype == "acute":
        assert 50 <= np.median(blood) <= 90
    assert np.median(infarct.hu[(infarct.bits & BITS["infarct"]) != 0]) < np.median(infarct.hu[brain]) - 4


def test_midline_shift_measured_from_the_falx_agrees_with_its_label():
    measured_cases = []
    for seed, severity in ((21, 0.95), (22, 0.6), (23, 0.15)):
        scan = make_subject(seed, "B", findings=("sdh",), severity=severity, matrix=128)
        measured = float(np.abs(_falx_head_x(scan)).max())
        predicted = scan.info["midline_shift_mm"]
        assert abs(measured - predicted) < 2.0, (measured, predicted)
        if abs(measured - 5.0) > 1.0:
            assert scan.labels["midline_shift"] == int(measured > 5.0)
        measured_cases.append(measured)
    assert max(measured_cases) > 7.0  # a large haematoma shifts the falx well beyond 5 mm
    normal = make_subject(24, "B", findings=(), matrix=128)
    assert np.abs(_falx_head_x(normal)).max() < 2.0 and normal.labels["midline_shift"] == 0


def test_dicom_geometry_read_back_by_simpleitk_and_fmct(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    generate_cohort(tmp_path, n=2, sites=("B", "A"), fmt="dicom", seed=3, matrix=64)
    record = json.loads((tmp_path / ".cases" / "synth00000.json").read_text())
    series = record["series"][0]
    folder = tmp_path / series["source"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert image.GetSize() == (64, 64, series["n_slices"])
    assert np.allclose(image.GetSpacing(), (series["pixel_mm"], series["pixel_mm"], series["thickness_mm"]), atol=1e-3)
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6)  # LPS axial, site B: no tilt
    volume = read_series(folder)
    lps_origin = volume.affine[:3, 3] * [-1, -1, 1]
    assert np.allclose(image.GetOrigin(), lps_origin, atol=1e-3)
    pixels = sitk.GetArrayFromImage(image)  # (K, J, I)
    assert np.array_equal(pixels.transpose(2, 1, 0), np.asarray(volume.hu))
    assert (
        -1024 <= pixels.min()
        and pixels.max() > 1000
        and 15 < np.median(pixels[pixels.shape[0] // 2, 28:36, 28:36]) < 45
    )

    first = pydicom.dcmread(next(folder.glob("*.dcm")))
    assert first.Modality == "CT" and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.PatientID == record["patient_id"] and first.PatientID.startswith("MRN")
    assert str(first.Manufacturer) == "SIEMENS" and float(first.SliceThickness) == pytest.approx(series["thickness_mm"])


def test_tilted_series_keeps_its_shear(tmp_path):
    subject = Subject(4, "A", findings=())
    acquisition = dataclasses.replace(subject.acquisition("routine", matrix=48), tilt_deg=-15.0)
    scan = subject.scan(acquisition)
    assert scan.affine[2, 1] == pytest.approx(np.sin(np.radians(-15.0)) * acquisition.pixel_mm)  # columns lean
    from fmct.io import write_series

    write_series(tmp_path / "tilted", np.rint(scan.hu), scan.affine, rescale=(1.0, 0.0))
    first = pydicom.dcmread(sorted((tmp_path / "tilted").glob("*.dcm"))[0])
    assert abs(float(first.GantryDetectorTilt)) == pytest.approx(abs(acquisition.tilt_deg), abs=0.01)
    volume = read_series(tmp_path / "tilted")
    assert np.allclose(volume.affine, scan.affine, atol=1e-3)


def test_same_seed_same_scan_and_workers_do_not_change_output(tmp_path):
    first = make_subject(9, "C", matrix=48)
    again = make_subject(9, "C", matrix=48)
    other = make_subject(10, "C", matrix=48)
    assert np.array_equal(first.hu, again.hu) and np.array_equal(first.bits, again.bits)
    assert first.hu.shape != other.hu.shape or not np.array_equal(first.hu, other.hu)

    generate_cohort(tmp_path / "one", n=3, fmt="nifti", seed=1, workers=1, matrix=32)
    generate_cohort(tmp_path / "two", n=3, fmt="nifti", seed=1, workers=2, matrix=32)
    assert (tmp_path / "one" / "labels.csv").read_text() == (tmp_path / "two" / "labels.csv").read_text()
    for name in ("nifti/synth00002.nii.gz", "masks/synth00001.nii.gz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_resume_skips_written_cases(tmp_path):
    first = generate_cohort(tmp_path, n=2, fmt="nifti", seed=2, matrix=32)
    second = generate_cohort(tmp_path, n=3, fmt="nifti", seed=2, matrix=32)
    assert (first.written, second.written, second.skipped) == (2, 1, 2)
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert [row["source"] for row in rows] == [f"nifti/synth0000{i}.nii.gz" for i in range(3)]
    assert list(rows[0])[:4] == ["source", "patient_id", "site", "split"] and list(rows[0])[4:] == list(FINDINGS)
    assert [row["site"] for row in rows] == ["A", "B", "C"]


def test_the_split_column_follows_the_shares_and_the_case_seeds_alone(tmp_path):
    # Ten cases of seed 2 (matrix 16: the split does not look at the images) with the default shares.
    generate_cohort(tmp_path, n=10, fmt="nifti", seed=2, matrix=16)

    def splits() -> list[str]:
        return [row["split"] for row in csv.DictReader((tmp_path / "labels.csv").open())]

    default = splits()
    assert set(default) <= {"train", "val", "test"}
    # A resumed cohort with other shares keeps its cases and re-draws no image; its split column follows
    # the new shares: every case in test, then every case in train.
    everything_test = generate_cohort(tmp_path, n=10, fmt="nifti", seed=2, matrix=16, split_fractions=(0, 0, 1))
    assert (everything_test.written, splits()) == (0, ["test"] * 10)
    generate_cohort(tmp_path, n=10, fmt="nifti", seed=2, matrix=16, split_fractions=(1, 0, 0))
    assert splits() == ["train"] * 10
    # Shares are thresholds on one uniform draw per case: moving the train share from 0.7 to 0 turns
    # exactly the default's train cases into val ones, the rest stay where they were.
    generate_cohort(tmp_path, n=10, fmt="nifti", seed=2, matrix=16, split_fractions=(0, 0.8, 0.2))
    assert splits() == [("val" if split == "train" else split) for split in default]
    assert json.loads((tmp_path / "synth.json").read_text())["split_fractions"] == [0, 0.8, 0.2]


def test_cq500_and_rsna_layouts(tmp_path):
    generate_cohort(tmp_path / "cq", n=2, layout="cq500", seed=5, matrix=24, sites=("B",))
    study = tmp_path / "cq" / "CQ500CT1 CQ500CT1" / "Unknown Study"
    assert sorted(p.name for p in study.iterdir()) == ["CT BONE", "CT PLAIN", "CT PLAIN THIN"]
    kernels = {pydicom.dcmread(next((study / s).glob("*.dcm"))).ConvolutionKernel for s in ("CT BONE", "CT PLAIN")}
    assert kernels == {"J70h", "J40s"}
    reads = list(csv.DictReader((tmp_path / "cq" / "reads.csv").open()))
    assert [r["name"] for r in reads] == ["CQ500-CT-0", "CQ500-CT-1"]
    assert {"R1:ICH", "R2:MidlineShift", "R3:CalvarialFracture"} <= set(reads[0])

    generate_cohort(tmp_path / "rsna", n=1, layout="rsna", seed=5, matrix=24, sites=("B",))
    slices = sorted((tmp_path / "rsna" / "stage_2_train").glob("ID_*.dcm"))
    rows = list(csv.DictReader((tmp_path / "rsna" / "stage_2_train.csv").open()))
    assert len(rows) == 6 * len(slices) > 0
    assert {row["ID"].rsplit("_", 1)[1] for row in rows} == {
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
        "any",
    }
    assert {row["ID"].rsplit("_", 1)[0] + ".dcm" for row in rows} == {p.name for p in slices}


def test_cli_synth_and_usage_errors(tmp_path, capsys):
    assert (
        main(["synth", "--out", str(tmp_path / "c"), "--n", "1", "--matrix", "24", "--format", "nifti", "--preview"])
        == 0
    )
    assert (tmp_path / "c" / "preview" / "synth00000.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["synth", "--out", str(tmp_path / "d"), "--sites", "A,Z"]) == 2
    assert "unknown site 'Z'" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "e"), "--layout", "rsna", "--format", "nifti"]) == 2
    assert main(["synth", "--out", str(tmp_path / "f"), "--split", "0.5,0.5"]) == 2
    assert "three shares (train, val, test) summing to 1" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "f"), "--split", "most,some,few"]) == 2
    assert "--split 'most,some,few': three numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_ich_is_learnable_but_not_trivially():
    """Logistic regression on the HU histogram of low-resolution volumes (96 x 96 pixels, away from bone)
    separates ich from normal clearly above chance, but not perfectly: subtle bleeds are hard."""
    from scipy import ndimage
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    features, labels = [], []
    for seed in range(80):
        findings = ("iph", "sdh", "edh", "sah", "ivh")[seed % 5 : seed % 5 + 1] if seed % 2 else ()
        scan = make_subject(1000 + seed, "ABC"[seed % 3], findings=findings, matrix=96)
        soft_tissue = (scan.hu > -10) & (scan.hu < 100) & ~ndimage.binary_dilation(scan.hu > 150)
        features.append(np.log1p(np.histogram(scan.hu[soft_tissue], bins=np.arange(-10, 101, 5))[0]))
        labels.append(scan.labels["ich"])
    features = np.array(features)
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-9)
    scores = cross_val_predict(
        LogisticRegression(C=0.1, max_iter=5000), features, np.array(labels), cv=5, method="predict_proba"
    )[:, 1]
    auc = roc_auc_score(labels, scores)
    assert 0.65 < auc < 0.97, auc
