"""Probes on synthetic embeddings: the embeddings table, splits, label budgets, predictions, the CLI."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmct.cli import main
from fmct.errors import InputError
from fmct.eval.embeddings import read_embeddings, write_embeddings
from fmct.eval.evaluate import evaluate, read_predictions
from fmct.eval.probe import ProbeConfig, run_probe
from fmct.pseudonym import patient_pseudonyms
from fmct.store import rebuild_tables, write_scan


def _cohort(tmp_path, n_patients=120, dim=24, seed=0):
    """Two scans per patient; ich shifts the first 4 feature dims by 2 SD; site B is shifted as a whole."""
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], 2)
    sites = np.where(np.arange(len(patients)) < 0.75 * len(patients), "A", "B")
    ich = np.repeat(rng.random(n_patients) < 0.3, 2).astype(int)
    features = rng.normal(size=(len(patients), dim))
    features[:, :4] += 2.0 * ich[:, None]
    features[sites == "B"] += 0.3
    scan_ids = [f"s{i:04d}" for i in range(len(patients))]
    write_embeddings(
        tmp_path / "emb",
        scan_ids,
        {"cls": features, "patch_mean": rng.normal(size=(len(patients), 8))},
        meta={"model": "tiny-vit", "arm": "pretrained", "checkpoint_sha256": "ab" * 32},
    )
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scan_id", "patient_id", "site", "split", "ich", "edh"])
        for i, scan_id in enumerate(scan_ids):
            # edh: only negatives and unknowns, so it cannot be trained and is skipped.
            writer.writerow([scan_id, patients[i], sites[i], "", ich[i], 0 if i % 2 else ""])
    return scan_ids, patients, sites, ich


def test_embeddings_round_trip_without_pickle(tmp_path):
    write_embeddings(tmp_path / "e", ["a", "bb"], {"cls": np.eye(2), "patch_mean": np.ones((2, 3))}, {"model": "m"})
    embeddings = read_embeddings(tmp_path / "e")
    assert embeddings.scan_ids.tolist() == ["a", "bb"] and embeddings.meta == {"model": "m"}
    assert embeddings.feature_matrix("concat").shape == (2, 5)
    with np.load(tmp_path / "e" / "embeddings.npz", allow_pickle=False) as data:
        assert data["scan_id"].dtype.kind == "U"
    with pytest.raises(InputError, match="unique"):
        write_embeddings(tmp_path / "f", ["a", "a"], {"cls": np.eye(2)})


@pytest.mark.parametrize("method", ["logistic", "knn"])
def test_probe_on_separable_embeddings_beats_chance_clearly(tmp_path, method):
    scan_ids, patients, sites, ich = _cohort(tmp_path)
    config = ProbeConfig(method=method, label_fractions=(0.1, 1.0), shots=(4,), seeds=2, ood_sites=("B",))
    summary = run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), tmp_path / "out", config)
    assert summary.findings == ["ich"] and summary.skipped[0].startswith("edh")

    predictions = read_predictions(tmp_path / "out")
    columns = predictions.columns
    assert set(columns["split"]) == {"test", "ood"}
    assert set(columns["site"][columns["split"] == "ood"]) == {"B"}
    assert set(columns["model"]) == {"tiny-vit"} and set(columns["arm"]) == {"pretrained"}
    # One row per test scan x budget x seed.
    n_test = len(set(columns["scan_id"]))
    assert len(columns["scan_id"]) == n_test * 3 * 2
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["embeddings"]["meta"]["checkpoint_sha256"] == "ab" * 32
    full = [f for f in run["fits"] if f["label_fraction"] == 1.0]
    tenth = [f for f in run["fits"] if f["label_fraction"] == 0.1]
    shots = [f for f in run["fits"] if f["shots"] == 4]
    train_pos, train_neg = (
        run["labels_per_split"]["ich"]["train"]["pos"],
        run["labels_per_split"]["ich"]["train"]["neg"],
    )
    assert full[0]["n_train_pos"] == train_pos and full[0]["n_train_neg"] == train_neg
    assert (
        tenth[0]["n_train_pos"] == max(1, round(0.1 * train_pos))
        and shots[0]["n_train_pos"] == 4 == shots[0]["n_train_neg"]
    )
    # No patient in two splits: both scans of every evaluated patient are evaluated, none trained on.
    evaluated = set(columns["scan_id"])
    evaluated_patients = {p for s, p in zip(scan_ids, patients) if s in evaluated}
    assert {s for s, p in zip(scan_ids, patients) if p in evaluated_patients} == evaluated
    # Patients are named by their keyed pseudonym (as ingest makes it), never by the labels' own patient_id.
    keyed = dict(zip(patients, patient_pseudonyms(list(patients))))
    assert not set(patients) & set(columns["patient_id"])
    assert {keyed[p] for p in evaluated_patients} == set(columns["patient_id"])
    assert run["scans_per_split"]["train"] + run["scans_per_split"]["val"] + len(evaluated) == len(scan_ids)

    for fraction in ("1.0", "0.1"):
        chosen = (columns["label_fraction"] == fraction) & (columns["seed"] == "0") & (columns["split"] == "test")
        auc = roc_auc_score(columns["label"][chosen], columns["score"][chosen])
        assert auc > (0.9 if fraction == "1.0" else 0.75), (method, fraction, auc)
    metrics = evaluate([tmp_path / "out"], n_bootstrap=100).metrics
    full_id = next(m for m in metrics if m["label_fraction"] == "1.0" and m["group"] == "ID")
    assert full_id["n_seeds"] == 2 and full_id["auroc"] > 0.9 and full_id["auroc_lo"] > 0.75


def test_probe_maps_source_labels_through_the_store(tmp_path):
    scan_ids, patients, sites, ich = _cohort(tmp_path, n_patients=60)
    store = tmp_path / "store"
    for i, scan_id in enumerate(scan_ids):
        row = {
            "scan_id": scan_id,
            "patient_key": f"key{i // 2}",
            "source": str(tmp_path / "dicom" / f"study{i}" / "series1"),
        }
        write_scan(store, np.zeros((2, 2, 2), np.int16), row)
    rebuild_tables(store)
    with open(tmp_path / "by_source.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "ich"])
        for i in range(len(scan_ids)):  # the study folder holds the series folder that ingest recorded
            writer.writerow([str(tmp_path / "dicom" / f"study{i}"), ich[i]])
        writer.writerow([str(tmp_path / "dicom" / "elsewhere"), 1])

    config = ProbeConfig(label_fractions=(1.0,), seeds=1)
    with pytest.raises(InputError, match="need --store"):
        run_probe(tmp_path / "emb", str(tmp_path / "by_source.csv"), tmp_path / "out", config)
    summary = run_probe(tmp_path / "emb", str(tmp_path / "by_source.csv"), tmp_path / "out", config, store_path=store)
    assert summary.notes[0] == "1 label rows match no scan of the store"
    assert summary.notes[1].startswith("no detector folders: the embeddings are not of a model folder's backbone")
    columns = read_predictions(tmp_path / "out").columns
    assert all(p.startswith("key") for p in columns["patient_id"])  # patient keys from the manifest
    for scan_id, patient in zip(columns["scan_id"], columns["patient_id"]):
        assert patient == f"key{int(scan_id[1:]) // 2}"


def test_probe_cli(tmp_path, capsys):
    _cohort(tmp_path, n_patients=60)
    code = main(
        [
            "probe",
            "--embeddings",
            str(tmp_path / "emb"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--out",
            str(tmp_path / "out"),
            "--label-fractions",
            "0.5,1",
            "--seeds",
            "2",
            "--features",
            "concat",
            "--findings",
            "ich",
            "--ood-sites",
            "B",
            "--arm",
            "scratch",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "predictions for ich" in capsys.readouterr().out
    columns = read_predictions(tmp_path / "out").columns
    assert set(columns["arm"]) == {"scratch"} and set(columns["label_fraction"]) == {"0.5", "1.0"}
    assert (tmp_path / "out" / "config.yaml").exists()

    (tmp_path / "bad.csv").write_text("scan_id,ich\ns0000,maybe\n")
    code = main(
        [
            "probe",
            "--embeddings",
            str(tmp_path / "emb"),
            "--labels",
            str(tmp_path / "bad.csv"),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and "bad.csv:2 column ich" in error and "Traceback" not in error


def test_the_labels_split_column_can_be_set_aside_for_the_configured_fractions(tmp_path):
    from fmct.eval.cohort import load_cohort
    from fmct.eval.probe import ProbeConfig

    labels = tmp_path / "labels.csv"
    # Every scan marked train by the file; 100 patients of one scan each, half positive.
    labels.write_text(
        "scan_id,patient_id,split,ich\n" + "".join(f"s{i:03d},p{i:03d},train,{i % 2}\n" for i in range(100))
    )
    scan_ids = [f"s{i:03d}" for i in range(100)]
    kept = load_cohort(str(labels), scan_ids, "the test", ProbeConfig())
    assert set(kept.split) == {"train"}
    own = load_cohort(str(labels), scan_ids, "the test", ProbeConfig(use_split_column=False, test_fraction=0.4))
    counts = own.split_counts()["scans_per_split"]
    assert counts["test"] == 40 and counts["val"] == 15 and counts["train"] == 45
    assert own.label_counts()["ich"]["test"] == {"pos": 20, "neg": 20}  # stratified per finding
