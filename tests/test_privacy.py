"""Privacy: keyed pseudonyms whose key never travels with the store, no identifier in any output of the
whole chain, and a store without its key that cannot be brought back to its patients."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from fmct.cli import main
from fmct.config import IngestConfig, load_config
from fmct.errors import ConfigError
from fmct.ingest import ingest
from fmct.pseudonym import load_key, local_sources
from fmct.store import Store
from phantoms import small_head, write_head

GRID = ["canonical.shape=[48,48,48]", "canonical.spacing_mm=4.5"]


def grid_config(*extra: str) -> IngestConfig:
    return load_config(IngestConfig, None, GRID + list(extra))


# ------------------------------------------------------------------------------------------- the key
def test_the_key_is_made_owner_only_and_refused_where_it_would_leak(tmp_path):
    key = load_key(tmp_path / "keys" / "k.key")
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600 and len(key.secret) == 32
    assert load_key(tmp_path / "keys" / "k.key").secret == key.secret  # made once, then read
    with pytest.raises(ConfigError, match="lies inside the store"):
        load_key(tmp_path / "store" / "k.key", outside=tmp_path / "store")
    key.path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\); run chmod 600"):
        load_key(key.path)
    (tmp_path / "bad.key").write_text("not hex")
    (tmp_path / "bad.key").chmod(0o600)
    with pytest.raises(ConfigError, match="not an fmct pseudonym key"):
        load_key(tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="no pseudonym key here"):
        load_key(tmp_path / "missing.key", create=False)


def test_the_store_holds_the_fingerprint_only_and_refuses_another_key_or_grid(tmp_path, capsys):
    write_head(tmp_path / "in" / "a", PatientID="P1")
    key_file = tmp_path / "keys" / "site.key"
    cli = ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "store"), *GRID]
    assert main([*cli, "--key", str(key_file)]) == 0
    key = load_key(key_file)
    identity = json.loads((tmp_path / "store" / "store.json").read_text())
    assert identity["key_fingerprint"] == key.fingerprint and identity["canonical"]["spacing_mm"] == 4.5
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert key.secret.hex().encode() not in stored and key.secret not in stored
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "store" / "scans").iterdir())

    assert main([*cli, "--key", str(tmp_path / "keys" / "missing.key")]) == 2  # no new key is made for an old store
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pseudonym key here" in err and not (tmp_path / "keys" / "missing.key").exists()
    load_key(tmp_path / "keys" / "other.key")
    capsys.readouterr()
    assert main([*cli, "--key", str(tmp_path / "keys" / "other.key")]) == 2  # another key: one line, nothing done
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with another pseudonym key" in err
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "store"),
                "--key",
                str(key_file),
                "canonical.shape=[48,48,48]",
                "canonical.spacing_mm=3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another canonical grid (canonical.spacing_mm 4.5 there, 3.0 here)" in err
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "store"),
                "--key",
                str(key_file),
                "canonical.shape=[64,64,64]",
                "canonical.spacing_mm=4.5",
            ]
        )
        == 2
    )
    assert "canonical.shape [48, 48, 48] there, [64, 64, 64] here" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "store" / "scans").iterdir()) == before
    assert main([*cli, "--key", str(tmp_path / "store" / "inside.key")]) == 2
    assert "inside the store" in capsys.readouterr().err


# ------------------------------------------------------------------------------- re-identification
MRNS = ["4471093", "5520871", "6183302"]  # the hospital's 7-digit MRN format: 10^7 candidates


def test_a_store_without_its_key_cannot_reproduce_a_patient_key(tmp_path):
    """The holder of a store (every file of it) and of the patients' MRN format tries what broke the salted
    scheme: hash each candidate MRN with every string the store holds as salt or key. Nothing matches;
    the key itself, which the store does not hold, reproduces every patient key."""
    for mrn in MRNS:
        write_head(tmp_path / "in" / mrn, PatientID=mrn)
    ingest([tmp_path / "in"], tmp_path / "store", grid_config(), progress=False)
    patient_keys = {row["patient_key"] for row in Store(tmp_path / "store").rows}
    assert len(patient_keys) == 3

    # every token of every file of the store: the candidate secrets (fingerprint, config values, keys, ...)
    text = " ".join(
        p.read_bytes().decode("latin-1") for p in (tmp_path / "store").rglob("*") if p.is_file() and p.suffix != ".npy"
    )
    tokens = sorted(set(re.findall(r"[\w.\-]+", text)))
    candidates = [str(n) for n in range(4470000, 4480000)] + MRNS  # 10,000 MRNs around one, and all three
    recovered = set()
    for secret in [""] + tokens:
        for mrn in candidates:
            message = f"patient\x00{mrn}".encode()
            for guess in (
                hashlib.sha256(f"{secret}\x00patient\x00{mrn}".encode()).hexdigest()[:16],  # the old salted key
                hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:16],
            ):
                if guess in patient_keys:
                    recovered.add(mrn)
    assert recovered == set(), recovered
    assert len(tokens) > 50  # a real search: every store token against 10^4 MRNs

    key = load_key()  # the key, kept outside the store, does reproduce them
    assert {key.pseudonym("patient", mrn) for mrn in MRNS} == patient_keys


# ---------------------------------------------------------------------------- the whole chain
PATIENTS = [(f"DOE{chr(65 + i)}", f"JANE{chr(65 + i)}", f"MRN55{i:05d}", f"ACC77{i:04d}") for i in range(12)]
TINY_PRETRAIN = [
    "model.size=tiny",
    "model.depth=2",
    "model.embed_dim=64",
    "model.n_heads=2",
    "model.img_size=32",
    "model.patch_size=8",
    "model.n_registers=1",
    "augment.global_size=32",
    "augment.local_size=16",
    "augment.n_local=2",
    "dino.n_prototypes=64",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "dino.teacher_temp_warmup_epochs=1",
    "optim.batch_size=2",
    "optim.epoch_length=2",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.layer_decay=1.0",
    "engine.device=cpu",
    "engine.workers=0",
    "engine.progress=false",
    "engine.log_every=1",
    "engine.checkpoint_every=2",
]


def plant_identifiers(root: Path) -> tuple[list[str], Path]:
    """12 patients whose names, MRNs, accession numbers and UIDs stand in their headers, folder names,
    file names and the labels file; return the identifiers and the labels file."""
    identifiers = ["19610203", "ST ELSEWHERE GENERAL", "HOUSE^GREGORY"]
    rows = []
    for i, (last, first, mrn, accession) in enumerate(PATIENTS):
        study_uid, series_uid = f"1.2.826.0.1.3680043.8.498.4242{i:02d}1", f"1.2.826.0.1.3680043.8.498.4242{i:02d}2"
        folder = root / "export" / f"{last}_{first}_{mrn}" / f"{accession}_CT_HEAD"
        files = write_head(
            folder,
            small_head(),
            PatientName=f"{last}^{first}",
            PatientID=mrn,
            AccessionNumber=accession,
            PatientBirthDate="19610203",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            InstitutionName="ST ELSEWHERE GENERAL",
            ReferringPhysicianName="HOUSE^GREGORY",
            StudyDescription=f"CT HEAD {last} {first}",
        )
        for k, path in enumerate(files):
            path.rename(folder / f"{mrn}_{last}_{first}_{k:03d}.dcm")
        identifiers += [
            last,
            f"{last}^{first}",
            f"{last} {first}",
            f"{last}_{first}",
            mrn,
            accession,
            study_uid,
            series_uid,
        ]
        rows.append({"source": str(folder), "patient_id": mrn, "site": "A", "ich": i % 2})
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["source", "patient_id", "site", "ich"])
        writer.writeheader()
        writer.writerows(rows)
    return identifiers, labels


def test_no_identifier_in_any_output_of_ingest_pretrain_embed_probe_evaluate_report(tmp_path, capsys):
    identifiers, labels = plant_identifiers(tmp_path / "in")
    out = tmp_path / "out"
    steps = [
        ["ingest", str(tmp_path / "in" / "export"), "--out", str(out / "store"), "--workers", "2", *GRID],
        ["pretrain", "--store", str(out / "store"), "--out", str(out / "run"), *TINY_PRETRAIN],
        [
            "embed",
            "--model",
            str(out / "run"),
            "--store",
            str(out / "store"),
            "--out",
            str(out / "embeddings"),
            "--workers",
            "1",
        ],
        [
            "probe",
            "--embeddings",
            str(out / "embeddings"),
            "--labels",
            str(labels),
            "--store",
            str(out / "store"),
            "--out",
            str(out / "probe"),
            "--label-fractions",
            "1",
            "--seeds",
            "1",
            "val_fraction=0.25",
            "test_fraction=0.34",
        ],
        ["evaluate", "--predictions", str(out / "probe"), "--out", str(out / "evaluation"), "--bootstrap", "20"],
        ["report", str(out / "evaluation"), "--out", str(out / "report.html"), "--bootstrap", "20"],
    ]
    printed = []
    for step in steps:
        assert main(step) == 0, step[0]
        captured = capsys.readouterr()
        printed += [captured.out, captured.err]

    outputs = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).parts[0] for p in outputs} >= {
        "store",
        "run",
        "embeddings",
        "probe",
        "evaluation",
        "report.html",
    }
    texts = printed + [p.read_bytes().decode("latin-1") for p in outputs]
    for identifier in identifiers:
        leaks = [i for i, text in enumerate(texts) if identifier.lower() in text.lower()]
        assert not leaks, (
            identifier,
            [str(outputs[i - len(printed)]) if i >= len(printed) else "printed" for i in leaks],
        )

    # the labels' patients are the store's patients, under one key; the real paths stay in the local map
    with open(out / "probe" / "predictions.csv", newline="") as handle:
        predicted_patients = {row["patient_id"] for row in csv.DictReader(handle)}
    assert predicted_patients and predicted_patients <= {row["patient_key"] for row in Store(out / "store").rows}
    real = set(local_sources().values())
    assert all(
        any(path.startswith(str(tmp_path / "in" / "export" / f"{last}_{first}_{mrn}")) for path in real)
        for last, first, mrn, _ in PATIENTS
    )
    key_file = Path(os.environ["FMCT_KEY_FILE"])
    assert stat.S_IMODE((key_file.parent / (key_file.name + ".sources.jsonl")).stat().st_mode) == 0o600
    # The chain really evaluated: every metric row has a finite AUROC or says why it is not estimable.
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["metrics"]
    assert metrics and all((row["auroc"] is not None and np.isfinite(row["auroc"])) or row["note"] for row in metrics)
