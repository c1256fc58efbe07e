"""Detectors from probe and finetune fits, `fmct predict` on scans no model has seen (DICOM, with saliency),
the saliency peak against planted bleeds, `fmct export` to ONNX, and Hugging Face style loading."""

from __future__ import annotations

import csv
import faulthandler
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fmct.scans.job
from fmct import hub
from fmct.cli import main
from fmct.config import CanonicalConfig, IngestConfig, save_config
from fmct.detector import Detector, load_detector, resolve_detector
from fmct.devices import autocast
from fmct.eval.embed import embed_store
from fmct.eval.embeddings import AUTO_CANDIDATES, FEATURE_SETS
from fmct.eval.evaluate import read_predictions
from fmct.eval.finetune import FinetuneConfig, run_finetune
from fmct.eval.probe import ProbeConfig, run_probe
from fmct.io import read_series, write_series
from fmct.models import ViT3DConfig
from fmct.predict import PredictConfig, predict
from fmct.pseudonym import load_key
from fmct.saliency import integrated_gradients, on_canonical_grid, peak_voxel, write_examples
from fmct.store import Store
from test_embed import BLOB_HU, BLOB_RADIUS, TINY, save_tiny_run, write_blob_store

torch.set_num_threads(1)

SPLITS = ["train"] * 20 + ["val"] * 8 + ["test"] * 8 + [""] * 4  # the last 4: site B, held out
SITES = ["A"] * 36 + ["B"] * 4
SIZE, SPACING = 48, 1.5  # the blob store's grid: 48^3 voxels of 1.5 mm
HEAD_RADII_MM = np.array([0.42, 0.46, 0.44]) * SIZE * SPACING  # write_blob_store's skull, as world radii
BRAIN = 0.85  # brain inside this share of the skull radii


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny ViT fine-tuned from scratch on the blob store (as in test_finetune): a detector folder in ft/fits/."""
    root = tmp_path_factory.mktemp("detector")
    store, _ = write_blob_store(root, n_scans=40, seed=1, splits=SPLITS, sites=SITES)
    # The grid the store's heads sit on, as ingest would record it: the head centred in the cube, so its
    # top (0.44 x 72 mm above the centre) lies 4.2 mm below the cube's top face.
    save_config(
        IngestConfig(canonical=CanonicalConfig(spacing_mm=SPACING, shape=(SIZE,) * 3, vertex_margin_mm=4.2)),
        store / "config.yaml",
    )
    config = FinetuneConfig(
        label_fractions=(1.0,),
        seeds=1,
        batch_size=8,
        max_steps=60,
        eval_every=20,
        patience=2,
        warmup_steps=5,
        lr=1e-3,
        workers=2,
        ood_sites=("B",),
        model=ViT3DConfig(**TINY),
    )
    run_finetune("scratch", store, str(root / "labels.csv"), root / "ft", config)
    return root, store, root / "ft"


def _store_scores(detector: Detector, store, scan_ids: list[str]) -> np.ndarray:
    hu = torch.from_numpy(np.stack([np.asarray(Store(store)[s][0]) for s in scan_ids])[:, None])
    with torch.no_grad():
        return detector.scores(hu).numpy()[:, 0]


def test_a_finetune_fit_is_a_detector_that_reproduces_its_scores(finetuned):
    root, store, out = finetuned
    folder = resolve_detector(out)
    assert folder == out / "fits" / "fraction1-seed0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "backbone",
        "config.json",
        "fit.json",
        "head.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["format"] == "fmct-detector"
        and config["findings"] == ["ich"]
        and config["backbone"]["path"] == "backbone"
    )
    assert (
        config["canonical"]["vertex_margin_mm"] == 4.2
        and config["grid_source"] == "the training store's ingest settings"
    )
    detector = load_detector(folder)
    columns = read_predictions(out).columns
    scores = _store_scores(detector, store, list(columns["scan_id"]))
    np.testing.assert_allclose(scores, columns["score"], atol=1e-4)  # the same model as the evaluated one
    # The predictions carry the detector's calibrated probabilities and validation thresholds (for evaluate and report).
    with torch.no_grad():
        np.testing.assert_allclose(
            columns["probability"], detector.calibrated(torch.from_numpy(scores[:, None])).numpy()[:, 0], atol=1e-5
        )
    assert np.all(
        columns["threshold_spec90"] == config["per_finding"]["ich"]["operating_points"]["spec90"]["threshold"]
    )

    # Operating points: chosen on the validation scans, where they reach their specificity.
    labels = {row["scan_id"]: int(row["ich"]) for row in csv.DictReader(open(root / "labels.csv"))}
    val = [f"s{i:03d}" for i in range(20, 28)]
    val_scores, val_labels = _store_scores(detector, store, val), np.array([labels[s] for s in val])
    ich = config["per_finding"]["ich"]
    val_probabilities = detector.calibrated(torch.from_numpy(val_scores[:, None])).numpy()[:, 0]
    for name, target in (("spec90", 0.9), ("spec95", 0.95)):
        point = ich["operating_points"][name]  # its threshold is on the probability
        specificity = np.mean(val_probabilities[val_labels == 0] < point["threshold"])
        assert specificity >= target and point["val_specificity"] == pytest.approx(specificity)
        assert 0 < point["threshold"] < 1
    assert ich["calibration"]["method"] in ("platt", "none") and ich["calibration"]["a"] > 0
    probabilities = detector.calibrated(torch.from_numpy(scores[:, None])).numpy()
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert np.corrcoef(probabilities[:, 0], scores)[0, 1] > 0.99  # monotone: the ranking is kept
    metrics = config["provenance"]["metrics"]["ich"]["ID"]
    assert metrics["n_scans"] == 8 and metrics["auroc_lo"] <= metrics["auroc"] <= metrics["auroc_hi"]
    card = (folder / "README.md").read_text()
    for heading in (
        "## Model",
        "## Data",
        "## Recipe",
        "## Metrics",
        "## Operating points",
        "## Intended use",
        "## Limits",
    ):
        assert heading in card


def _phantom_dicom(folder, centre_mm, bleed: bool, seed: int) -> np.ndarray:
    """A head like the blob store's (skull 1000 HU, brain 35, noise 8) at world centre ``centre_mm`` as an
    oblique DICOM series (0.75 x 0.75 x 2 mm, rotated 10 degrees about L-R), with a BLOB_HU bleed of
    BLOB_RADIUS voxels (15 mm) near the brain's right front top when ``bleed``; patient identifiers in the
    headers. Returns the bleed centre (world RAS mm)."""
    shape, spacing = (110, 110, 42), (0.75, 0.75, 2.0)
    angle = np.radians(10.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], -spacing[1], spacing[2]])  # radiological: i to the left
    affine[:3, 3] = centre_mm - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)
    radius = np.sqrt((((world - centre_mm) / HEAD_RADII_MM) ** 2).sum(-1))
    rng = np.random.default_rng(seed)
    hu = np.where(radius < 1.0, 1000.0, -1000.0)
    hu[radius < BRAIN] = 35.0
    bleed_centre = centre_mm + np.array([8.0, 6.0, 4.0])
    if bleed:
        hu[np.linalg.norm(world - bleed_centre, axis=-1) < BLOB_RADIUS * SPACING] = BLOB_HU
    hu += rng.normal(0, 8, size=shape)
    write_series(folder, hu, affine, tags={"PatientName": "Doe^Jane", "PatientID": "PID-31337", "Modality": "CT"})
    return bleed_centre


def test_predict_an_unseen_dicom_scan_with_saliency(finetuned, tmp_path, capsys):
    root, store, ft = finetuned
    dicom = tmp_path / "Doe_Jane_MRN31337"  # identifiers in the path must not reach the outputs
    centre = np.array([4.0, -20.0, 35.0])
    bleed_centre = _phantom_dicom(dicom / "bleed", centre, bleed=True, seed=11)
    _phantom_dicom(dicom / "normal", centre, bleed=False, seed=12)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--model",
        str(ft),
        "--out",
        str(out),
        str(dicom / "bleed"),
        str(dicom / "normal"),
        str(tmp_path / "broken.nii.gz"),
        "--saliency",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 scans (0 reused)" in capsys.readouterr().out

    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(r["input"], r["finding"]) for r in rows] == [("1", "ich"), ("2", "ich")]
    bleed, normal = rows
    assert 0 <= float(normal["probability"]) < float(bleed["probability"]) <= 1
    assert bleed["positive_spec90"] == "1" and normal["positive_spec95"] == "0"
    assert float(bleed["threshold_spec90"]) == pytest.approx(
        json.loads((ft / "fits" / "fraction1-seed0" / "config.json").read_text())["per_finding"]["ich"][
            "operating_points"
        ]["spec90"]["threshold"]
    )
    for row in rows:  # a decision follows from the probability and threshold beside it
        for point in ("spec90", "spec95"):
            assert row[f"positive_{point}"] == str(int(float(row["probability"]) >= float(row[f"threshold_{point}"])))
    text = (out / "predictions.csv").read_text() + (out / "errors.csv").read_text()
    assert all(len(r["scan_id"]) == 16 and int(r["scan_id"], 16) >= 0 for r in rows)
    assert "Doe" not in text and "31337" not in text and str(tmp_path) not in text
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert len(errors) == 1 and errors[0]["input"] == "3" and "unreadable NIfTI" in errors[0]["reason"]

    # The heatmap lies on the source series' own grid, and peaks at the planted bleed.
    import nibabel as nib

    heat = nib.load(out / bleed["saliency_nifti"])
    source = read_series(dicom / "bleed")
    assert heat.shape == source.shape
    np.testing.assert_allclose(heat.affine, source.affine, atol=1e-4)
    data = np.asarray(heat.dataobj)
    peak_world = source.world(np.array(np.unravel_index(np.argmax(data), data.shape)))
    peak_row = np.array([float(bleed[f"peak_{axis}_mm"]) for axis in "xyz"])
    with capsys.disabled():
        print(
            f"saliency peak on the unseen DICOM series: {np.linalg.norm(peak_row - bleed_centre):.1f} mm "
            f"from the bleed's centre (canonical grid), {np.linalg.norm(peak_world - bleed_centre):.1f} mm "
            f"(source grid); bleed radius {BLOB_RADIUS * SPACING:g} mm"
        )
    assert np.linalg.norm(peak_world - bleed_centre) < BLOB_RADIUS * SPACING, (
        peak_world,
        bleed_centre,
    )  # inside the bleed
    assert np.linalg.norm(peak_row - bleed_centre) < BLOB_RADIUS * SPACING
    png = (out / bleed["saliency_png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    assert main(argv) == 0  # a re-run reuses every finished scan
    assert "2 scans (2 reused)" in capsys.readouterr().out
    assert list(csv.DictReader(open(out / "predictions.csv"))) == rows


def _blob_head(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A canonical head as write_blob_store draws it, always with its bleed: int16 HU, the bleed mask and
    the brain mask."""
    grid = np.stack(np.meshgrid(*[np.arange(SIZE) - (SIZE - 1) / 2] * 3, indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.42, 0.46, 0.44])[:, None, None, None] / SIZE) ** 2).sum(0))
    hu = np.full((SIZE,) * 3, -1000.0)
    hu[radius < 1.0] = 1000.0
    hu[radius < BRAIN] = 35.0
    centre = rng.uniform(-8, 8, size=3)
    mask = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < BLOB_RADIUS
    hu[mask] = BLOB_HU
    hu += rng.normal(0, 8, size=hu.shape)
    return np.round(hu).astype(np.int16), mask, radius < BRAIN


def test_the_saliency_peak_falls_inside_planted_bleeds_far_more_often_than_chance(finetuned):
    detector = load_detector(resolve_detector(finetuned[2]))
    rng = np.random.default_rng(2024)
    hits, chance, gaps = [], [], []
    for _ in range(16):
        hu, mask, brain = _blob_head(rng)
        x = detector.model_input(torch.from_numpy(hu[None, None]))
        with autocast(torch.device("cpu")):
            attribution = integrated_gradients(detector, x, steps=16)
        with torch.no_grad():  # completeness: the attributions add up to score(scan) - score(black baseline)
            difference = float(detector.scores_of_input(x) - detector.scores_of_input(torch.zeros_like(x)))
        gaps.append(abs(float(attribution.sum()) - difference) / max(abs(difference), 1e-6))
        heat = on_canonical_grid(attribution, hu.shape, SPACING, sigma_mm=8.0)[0]
        hits.append(bool(mask[peak_voxel(heat)]))
        chance.append(mask.sum() / brain.sum())  # a peak drawn uniformly in the brain
    hit_rate, chance_rate = float(np.mean(hits)), float(np.mean(chance))
    print(
        f"saliency peak inside the bleed: {hit_rate:.2f} of 16 scans; chance {chance_rate:.2f}; "
        f"completeness gap median {np.median(gaps):.3f}"
    )
    assert hit_rate >= 0.75 and hit_rate >= 3 * chance_rate, (hit_rate, chance_rate)
    assert np.median(gaps) < 0.1


def test_a_detector_no_better_than_chance_is_warned_of_or_refused(finetuned, tmp_path, capsys):
    root, store, ft = finetuned
    folder = tmp_path / "chance"
    shutil.copytree(resolve_detector(ft), folder)
    config = json.loads((folder / "config.json").read_text())
    # As the demo's midline_shift detector: a validation AUROC of 0.21, its CI not above 0.5.
    config["per_finding"]["ich"]["validation"].update(
        auroc=0.21,
        auroc_lo=0.05,
        auroc_hi=0.52,
        validated=False,
        reason="no better than chance on validation: AUROC 0.21 [0.05, 0.52] includes 0.5",
    )
    (folder / "config.json").write_text(json.dumps(config))
    scan = tmp_path / "scan"
    _phantom_dicom(scan, np.array([4.0, -20.0, 35.0]), bleed=True, seed=13)

    assert (
        main(["predict", "--model", str(folder), "--out", str(tmp_path / "refused"), str(scan), "--require-validated"])
        == 2
    )
    refused = capsys.readouterr().err.strip().splitlines()
    assert (
        refused[-1].startswith("fmct predict: ")
        and "not validated, refused (--require-validated): ich: no better than "
        "chance on validation: AUROC 0.21 [0.05, 0.52] includes 0.5"
        in refused[-1]
    )
    assert not (tmp_path / "refused" / "predictions.csv").exists()

    assert main(["predict", "--model", str(folder), "--out", str(tmp_path / "warned"), str(scan)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert warned == [
        "predict: WARNING: ich: no better than chance on validation: AUROC 0.21 [0.05, 0.52] includes 0.5; "
        "its probabilities are not to be trusted"
    ]
    recorded = json.loads((tmp_path / "warned" / "predict.json").read_text())
    assert recorded["warnings"] == ["ich: no better than chance on validation: AUROC 0.21 [0.05, 0.52] includes 0.5"]
    assert len(list(csv.DictReader(open(tmp_path / "warned" / "predictions.csv")))) == 1


def test_probe_fits_are_detectors_and_the_seed0_fit_with_most_labels_is_picked(tmp_path):
    store, _ = write_blob_store(tmp_path, n_scans=24, seed=3)
    run = save_tiny_run(tmp_path / "run")
    embed_store(run, store, tmp_path / "emb", progress=False)
    out = tmp_path / "probe"
    run_probe(
        tmp_path / "emb",
        str(tmp_path / "labels.csv"),
        out,
        ProbeConfig(label_fractions=(0.5, 1.0), seeds=2, features="concat", val_fraction=0.25, test_fraction=0.25),
    )
    assert sorted(p.name for p in (out / "fits").iterdir()) == [
        "fraction0.5-seed0",
        "fraction0.5-seed1",
        "fraction1-seed0",
        "fraction1-seed1",
    ]
    assert resolve_detector(out) == out / "fits" / "fraction1-seed0"
    assert resolve_detector(out, fit="fraction0.5-seed1") == out / "fits" / "fraction0.5-seed1"
    from safetensors.torch import load_file

    head = load_file(out / "fits" / "fraction1-seed0" / "head.safetensors")
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "mean": (1, 128),
        "scale": (1, 128),
        "coef": (1, 128),
        "intercept": (1,),
    }
    config = json.loads((out / "fits" / "fraction1-seed0" / "config.json").read_text())
    # A frozen backbone by reference: a path relative to the detector folder, found again from it.
    assert not Path(config["backbone"]["path"]).is_absolute() and config["backbone"]["sha256"]
    assert (out / "fits" / "fraction1-seed0" / config["backbone"]["path"]).resolve() == (run / "backbone").resolve()
    assert config["provenance"]["budget"] == {"label_fraction": 1.0, "shots": None}

    detector = Detector.from_pretrained(out)  # huggingface_hub's mixin; a local folder never touches the network
    columns = read_predictions(out).columns
    mine = (columns["label_fraction"] == "1.0") & (columns["seed"] == "0")
    np.testing.assert_allclose(
        _store_scores(detector, store, list(columns["scan_id"][mine])), columns["score"][mine], atol=1e-3
    )
    detector.save_pretrained(tmp_path / "shared")  # self-contained: the referenced backbone is copied in
    copy = Detector.from_pretrained(tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["backbone"]["path"] == "backbone"
    np.testing.assert_allclose(
        _store_scores(copy, store, ["s000", "s001"]), _store_scores(detector, store, ["s000", "s001"]), atol=1e-6
    )

    run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), out, ProbeConfig(label_fractions=(0.5,), seeds=1))
    assert sorted(p.name for p in (out / "fits").iterdir()) == ["fraction0.5-seed0"]  # the earlier run's fits are gone

    run_probe(
        tmp_path / "emb",
        str(tmp_path / "labels.csv"),
        tmp_path / "knn",
        ProbeConfig(method="knn", label_fractions=(1.0,), seeds=1),
    )
    assert not (tmp_path / "knn" / "fits").exists()
    assert "k-NN probes are not saved" in json.dumps(
        json.loads((tmp_path / "knn" / "run.json").read_text())["labels"]["notes"]
    )

    (run / "backbone" / "model.safetensors").write_bytes(
        hub.safetensors_bytes({k: v + 1 for k, v in hub.load(run / "backbone").state_dict().items()})
    )
    assert (
        main(["predict", "--model", str(out), "--out", str(tmp_path / "p"), str(tmp_path)]) == 2
    )  # the backbone changed


def test_a_probe_detector_rebuilds_the_feature_set_its_fit_chose(tmp_path):
    """auto (the table's default), and two sets named outright: predict's Detector rebuilds each from the
    backbone (cls | patch_mean | patch_max, in that order) and gives the probe's own test scores."""
    store, _ = write_blob_store(tmp_path, n_scans=24, seed=3)
    run = save_tiny_run(tmp_path / "run")
    embed_store(run, store, tmp_path / "emb", progress=False)
    for features in ("", "patch_max", "cls_mean_max"):
        out = tmp_path / (features or "auto")
        run_probe(
            tmp_path / "emb",
            str(tmp_path / "labels.csv"),
            out,
            ProbeConfig(label_fractions=(1.0,), seeds=1, features=features, val_fraction=0.25, test_fraction=0.25),
        )
        predictions = read_predictions(out)
        assert predictions.run["features"] == (features or "auto")
        (chosen,) = {fit["features"] for fit in predictions.run["fits"]}
        assert chosen in AUTO_CANDIDATES if not features else chosen == features
        config = json.loads((out / "fits" / "fraction1-seed0" / "config.json").read_text())
        assert config["feature"] == chosen == config["provenance"]["recipe"]["features"]
        detector = Detector.from_pretrained(out)
        assert detector.scorer.coef.shape == (1, 64 * len(FEATURE_SETS[chosen]))
        columns = predictions.columns
        np.testing.assert_allclose(
            _store_scores(detector, store, list(columns["scan_id"])), columns["score"], atol=1e-3
        )


def test_a_probe_detector_on_the_change_logit_rebuilds_it_from_the_change_heads(tmp_path):
    store, _ = write_blob_store(tmp_path, n_scans=24, seed=3)
    run = save_tiny_run(tmp_path / "run", change_heads=True)
    embed_store(run, store, tmp_path / "emb", progress=False)
    out = tmp_path / "probe"
    config = ProbeConfig(label_fractions=(1.0,), seeds=1, features="change", val_fraction=0.25, test_fraction=0.25)
    run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), out, config)
    detector = Detector.from_pretrained(out)
    assert detector.scorer.coef.shape == (1, 1) and detector.scorer.backbone.change_head is not None
    columns = read_predictions(out).columns
    np.testing.assert_allclose(_store_scores(detector, store, list(columns["scan_id"])), columns["score"], atol=1e-3)


def test_export_to_onnx_matches_torch(finetuned, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    root, store, ft = finetuned
    assert main(["export", "--model", str(ft), "--out", str(tmp_path / "detector.onnx")]) == 0, capsys.readouterr().err
    session = ort.InferenceSession(str(tmp_path / "detector.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["findings"] == "ich"
    hu = np.stack([np.asarray(Store(store)[i][0]) for i in (28, 29, 30)])[:, None].astype(
        np.float32
    )  # batch 3: dynamic
    runtime = session.run(["probability"], {"hu": hu})[0]
    with torch.no_grad():
        reference = load_detector(resolve_detector(ft))(torch.from_numpy(hu)).numpy()
    assert runtime.shape == (3, 1) and np.max(np.abs(runtime - reference)) < 1e-3


def test_hugging_face_style_folders_load_and_save(finetuned, tmp_path):
    model = hub.ViT3DModel.from_pretrained("fmct-synth-tiny")  # a shipped name, offline
    assert model.hub_extra["method"] == "anomaly"
    model.save_pretrained(tmp_path / "backbone")
    flat = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert (
        flat["version"] == 2
        and flat["embed_dim"] == 128
        and "config" not in flat
        and flat["windows"][0] == [40.0, 80.0]
    )
    assert "## Intended use" in (tmp_path / "backbone" / "README.md").read_text()
    again = hub.ViT3DModel.from_pretrained(tmp_path / "backbone")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    detector = Detector.from_pretrained(finetuned[2])
    detector.save_pretrained(tmp_path / "detector")  # self-contained: carries its backbone
    copy = Detector.from_pretrained(tmp_path / "detector")
    hu = torch.from_numpy(np.asarray(Store(finetuned[1])[30][0])[None, None].copy())
    with torch.no_grad():
        assert torch.allclose(detector(hu), copy(hu), atol=1e-6)


def test_predict_refuses_what_is_not_a_detector_in_one_line(tmp_path, capsys):
    hub.save(hub.random_init(ViT3DConfig(**TINY), seed=0), tmp_path / "model")
    assert main(["predict", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "neither a detector folder nor a probe/finetune output" in error and error.count("\n") == 1


def test_predict_names_scans_like_ingest_under_the_same_key(finetuned, tmp_path, pseudonym_key_file):
    _phantom_dicom(tmp_path / "dicom", np.array([0.0, 0.0, 0.0]), bleed=False, seed=5)
    assert main(["ingest", str(tmp_path / "dicom"), "--out", str(tmp_path / "store")]) == 0
    stored = Store(tmp_path / "store").scan_ids
    summary = predict(finetuned[2], [tmp_path / "dicom"], tmp_path / "out", progress=False)  # the session's key
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert summary.n_scans == 1 and [r["scan_id"] for r in rows] == stored
    files = sorted((tmp_path / "dicom").iterdir())  # the series given file by file is still one scan
    assert predict(finetuned[2], files, tmp_path / "by_file", progress=False).n_scans == 1
    assert [r["scan_id"] for r in csv.DictReader(open(tmp_path / "by_file" / "predictions.csv"))] == stored
    predict(
        finetuned[2], [tmp_path / "dicom"], tmp_path / "other", key_file=tmp_path / "keys" / "other.key", progress=False
    )
    assert list(csv.DictReader(open(tmp_path / "other" / "predictions.csv")))[0]["scan_id"] != stored[0]  # another key


def _abort_on(folder_name: str):
    """A series reader that aborts its process natively (SIGABRT, as a C decoder does) for the series in
    ``folder_name``."""
    original = fmct.scans.job.read_series

    def read(info, config=None):
        if Path(info.source.rpartition("#")[0]).name == folder_name:
            faulthandler.disable()  # pytest's handler would print the worker's stack
            os.abort()
        return original(info, config)

    return read


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the hook reaches workers by fork")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_reader_that_crashes_costs_predict_only_its_scan(finetuned, tmp_path, monkeypatch, workers):
    for seed, name in enumerate(("first", "crash", "third")):
        _phantom_dicom(tmp_path / name, np.zeros(3), bleed=False, seed=seed)
    paths = [tmp_path / name for name in ("first", "crash", "third")]
    monkeypatch.setattr(fmct.scans.job, "read_series", _abort_on("crash"))
    config = PredictConfig(workers=workers, batch_size=2)
    summary = predict(finetuned[2], paths, tmp_path / "out", config, progress=False)
    assert summary.n_scans == 2  # the scans before and after the crash are scored
    assert [row["input"] for row in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))] == ["1", "3"]
    (error,) = csv.DictReader(open(tmp_path / "out" / "errors.csv"))
    assert error["input"] == "2" and len(error["scan_id"]) == 16
    assert error["reason"] == (
        "the worker process reading this scan died (killed by SIGABRT): a crash in native code such as an "
        "image decoder, or out of memory; the batch went on without it (a re-run tries it again)"
    )
    monkeypatch.undo()
    again = predict(finetuned[2], paths, tmp_path / "out", config, progress=False)
    assert (again.n_scans, again.n_reused, again.errors) == (3, 2, [])


def test_predict_names_the_unreadable_slice_behind_a_gap(finetuned, tmp_path, pseudonym_key_file):
    folder = tmp_path / "Doe_Jane_MRN31337"
    _phantom_dicom(folder, np.zeros(3), bleed=False, seed=3)
    broken = sorted(folder.iterdir())[20]
    broken.write_bytes(broken.read_bytes()[:300])  # its header cut: no slice of the series, a gap in its place
    predict(finetuned[2], [folder], tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "errors.csv").read_text()
    scan, header = sorted(csv.DictReader(io.StringIO(text)), key=lambda row: row["scan_id"] == "")
    name = load_key(pseudonym_key_file).pseudonym("source", str(broken))
    assert re.fullmatch(
        rf"gap of 4\.00 mm at -?[\d.]+ mm along the slice normal, after slice \d+ of 41 \(median 2\.00 mm\); "
        rf"its folder holds 1 unreadable DICOM files, such as file {name} \(unreadable DICOM header: .+\)",
        scan["reason"],
    ), scan["reason"]
    assert header["scan_id"] == "" and header["reason"].startswith("unreadable DICOM header")
    assert "Doe" not in text and broken.name not in text and str(tmp_path) not in text


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo (refs/main -> snapshots/<commit>/)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_repo_ids_load_through_huggingface_hub_from_its_cache(finetuned, tmp_path):
    Detector.from_pretrained(finetuned[2]).save_pretrained(tmp_path / "detector")
    _hub_cache(tmp_path / "cache", "fmct/tiny-detector", tmp_path / "detector")
    _hub_cache(tmp_path / "cache", "fmct/tiny-backbone", tmp_path / "detector" / "backbone")
    detector = Detector.from_pretrained("fmct/tiny-detector", cache_dir=tmp_path / "cache", local_files_only=True)
    backbone = hub.ViT3DModel.from_pretrained("fmct/tiny-backbone", cache_dir=tmp_path / "cache", local_files_only=True)
    assert detector.findings == ["ich"] and backbone.config == detector.backbone.config
    assert all(
        torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), detector.backbone.state_dict().values())
    )


def test_saliency_examples_beside_the_predictions_in_the_layout_the_report_reads(finetuned, tmp_path):
    root, store, ft = finetuned
    out = tmp_path / "ft"
    shutil.copytree(ft, out)
    rows = [
        {
            **r,
            "label": int(r["label"]),
            "score": float(r["score"]),
            "seed": int(r["seed"]),
            "label_fraction": float(r["label_fraction"]),
            "threshold_spec90": float(r["threshold_spec90"]),
            "probability": float(r["probability"]),
        }
        for r in csv.DictReader(open(out / "predictions.csv"))
    ]
    assert write_examples(out, rows, store, per_kind=2) == len(list(out.glob("saliency/*/ich.png"))) >= 1
    called = {r["scan_id"]: r for r in rows if r["probability"] >= r["threshold_spec90"]}
    for png in out.glob("saliency/*/ich.png"):  # fmct report: saliency/<scan_id>/<finding>.png
        assert png.parent.name in called and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _absolute_paths(folder: Path, roots: list[str]) -> list[str]:
    """Every file under ``folder`` (text or binary) holding one of ``roots`` (absolute path prefixes)."""
    return [
        f"{path}: {root}"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        for root in roots
        if root.encode() in _readable_bytes(path)
    ]


def _readable_bytes(path: Path) -> bytes:
    """A file's bytes that could hold a path: a safetensors file's JSON header (names and metadata), since its
    tensor bytes are arbitrary (a 4 MB file holds a given 3-byte string such as ``C:\\`` about one time in four)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return data[8 : 8 + int.from_bytes(data[:8], "little")]
    return data


def test_no_machine_path_in_a_detector_folder_or_the_shipped_checkpoint(finetuned, tmp_path):
    root, store, ft = finetuned
    roots = [str(root.resolve()), str(Path(tempfile.gettempdir()).resolve()), str(Path.home()), str(Path.cwd())]
    for folder in sorted((ft / "fits").iterdir()):  # a fine-tuned detector, with its own backbone/
        assert _absolute_paths(folder, roots) == []
        assert (folder / "backbone" / "config.json").is_file()
    shipped = hub.SHIPPED_DIR / "fmct-synth-tiny"
    assert _absolute_paths(shipped, ["/home/", "/root/", "/tmp/", "/work/", "/Users/", "C:\\"]) == []
    assert json.loads((shipped / "config.json").read_text())["store"]["name"] == "store"  # a bare name


def readme_python_snippets() -> list[str]:
    """Every ```python block of the README, in order."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_every_python_snippet_of_the_readme_runs(finetuned, tmp_path, monkeypatch, capsys):
    """The README's snippets, in order and in one namespace, in a folder holding what they name: a finetune
    output ``ft``, a ``store`` ingested from ``scans/``: a DICOM series ``series_a`` and a NIfTI
    ``scan_b.nii.gz``, and ``detector.onnx``."""
    import nibabel as nib

    from fmct.export import export_onnx

    root, store, ft = finetuned
    snippets = readme_python_snippets()
    assert len(snippets) >= 5
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ft, "ft")
    centre = np.array([4.0, -20.0, 35.0])
    _phantom_dicom(Path("scans/series_a"), centre, bleed=True, seed=21)
    volume = Detector.from_pretrained("ft").canonical_hu("scans/series_a")
    spacing = json.loads((resolve_detector("ft") / "config.json").read_text())["canonical"]["spacing_mm"]
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([spacing] * 3 + [1.0])), "scans/scan_b.nii.gz")
    export_onnx("ft", "detector.onnx")
    assert main(["ingest", "scans", "--out", "store", "--workers", "1"]) == 0
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    printed = capsys.readouterr().out
    assert "'probability'" in printed and "torch.Size([1, 128])" in printed and "(1, 1)" in printed
    result = namespace["result"]["ich"]
    assert 0 < result["probability"] < 1 and set(result) == {
        "probability",
        "score",
        "positive_spec90",
        "positive_spec95",
        "validated",
    }


def test_detector_predict_takes_a_path_a_volume_or_an_array_and_refuses_another_grid(finetuned, tmp_path):
    from fmct.errors import InputError
    from fmct.io import read_scan

    root, store, ft = finetuned
    detector = Detector.from_pretrained(ft)
    _phantom_dicom(tmp_path / "series", np.array([4.0, -20.0, 35.0]), bleed=True, seed=22)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(ft), "--out", str(out), str(tmp_path / "series")]) == 0
    (row,) = list(csv.DictReader(open(out / "predictions.csv")))

    by_path = detector.predict(tmp_path / "series")["ich"]
    assert by_path["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)  # what fmct predict says
    assert by_path["positive_spec90"] == (row["positive_spec90"] == "1")
    volume = read_scan(tmp_path / "series")
    assert detector.predict(volume)["ich"]["probability"] == pytest.approx(by_path["probability"], abs=1e-6)
    by_array = detector.predict(volume.hu, affine=volume.affine)["ich"]
    assert by_array["probability"] == pytest.approx(by_path["probability"], abs=1e-6)
    as_tensor = detector.predict(torch.from_numpy(detector.canonical_hu(volume)))[
        "ich"
    ]  # on the grid: no affine needed
    assert as_tensor["probability"] == pytest.approx(by_path["probability"], abs=1e-6)

    with pytest.raises(
        InputError, match=r"a volume of \[128, 128, 128\] voxels is not on this detector's canonical grid"
    ):
        detector.predict(np.zeros((128, 128, 128), np.int16))
    with pytest.raises(InputError, match="no scan to predict"):
        detector.predict(tmp_path / "out")
