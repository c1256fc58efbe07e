"""Probes on frozen embeddings (``fmct probe``): one binary classifier per finding, label budget and seed.

Methods:
- ``logistic``: L2-regularised logistic regression on standardised features (scikit-learn); the inverse
  regularisation C is chosen on the validation split by AUROC over ``c_grid`` (the smaller C wins a tie).
- ``knn``: cosine k-nearest neighbours; score = the exp(similarity / T)-weighted share of positives among
  the k nearest training scans (T = 0.07 as DINO's k-NN evaluation); k chosen on validation by AUROC.

The attentive probe over patch tokens needs the tokens themselves, which the embeddings table does not
hold; it belongs with ``finetune``.

Splits come from :mod:`fmct.eval.splits` (by patient, stratified, ``split`` column wins, OOD sites test
only), fixed by ``split_seed``. Each seed draws its own training subset for each label budget
(:func:`fmct.eval.splits.training_subset`); validation always uses every labelled validation scan.
The scores of the test (``test``) and held-out-site (``ood``) scans go to ``predictions.csv`` in the
format of :mod:`fmct.eval.evaluate`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from fmct.config import save_config, to_dict
from fmct.datasets import load_labels, match_to_store
from fmct.pseudonym import patient_pseudonyms
from fmct.eval.embeddings import read_embeddings
from fmct.eval.evaluate import write_predictions
from fmct.eval.metrics import auroc
from fmct.eval.splits import assign_splits, training_subset


@dataclass
class ProbeConfig:
    method: str = "logistic"  # logistic | knn
    features: str = ""  # cls | patch_mean | concat (a backbone's), first_order (the HU histogram's); empty: the table's default
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    shots: tuple[int, ...] = ()  # N positives and N negatives per finding, in addition to the fractions
    seeds: int = 5  # seeds 0 .. seeds-1, each its own training subset
    split_seed: int = 0
    use_split_column: bool = True  # false: ignore the labels' split column, split every scan by the fractions below
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    ood_sites: tuple[str, ...] = ()  # sites whose scans are test-only (out-of-distribution)
    findings: tuple[str, ...] = ()  # empty: every finding of the labels
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    knn_k: tuple[int, ...] = (5, 10, 20, 50)
    knn_temperature: float = 0.07
    model: str = ""  # name in the predictions; empty: the embeddings' meta "model", else the folder name
    arm: str = ""  # e.g. pretrained | scratch; empty: the embeddings' meta "arm", else "pretrained"


@dataclass
class ProbeSummary:
    n_predictions: int
    findings: list[str]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self, out: Path) -> str:
        lines = [f"probe: {self.n_predictions} predictions for {', '.join(self.findings) or 'no finding'} -> {out / 'predictions.csv'}"]
        lines += [f"  skipped {s}" for s in self.skipped] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ classifiers
def fit_logistic(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, x_eval: np.ndarray,
    c_grid: tuple[float, ...],
) -> tuple[np.ndarray, dict]:
    """Scores (log-odds) of ``x_eval`` from logistic regression with C chosen by validation AUROC.

    Features are (N, C) arrays, labels (N,) 0/1. Returns the scores and ``{"C", "val_auroc", "chosen_on"}``.
    """
    choose = len(set(y_val.tolist())) == 2  # AUROC on validation needs both classes there
    scaler = StandardScaler().fit(x_train)
    x_train, x_eval = scaler.transform(x_train), scaler.transform(x_eval)
    x_val = scaler.transform(x_val) if choose else x_val
    best = None
    for c in (c_grid if choose else [1.0]):
        with warnings.catch_warnings():
            # Few samples at a large C may stop short of convergence; the validation AUROC judges the fit anyway.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        val_auc = float(auroc(y_val, model.decision_function(x_val))) if choose else float("nan")
        if best is None or val_auc > best[0]:
            best = (val_auc, c, model)
    val_auc, c, model = best
    return model.decision_function(x_eval), {"C": c, "val_auroc": val_auc, "chosen_on": "val" if choose else "default"}


def _knn_scores(x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, k: int, temperature: float) -> np.ndarray:
    k = min(k, len(x_train))
    similarity = x_query @ x_train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weight = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    return (weight * y_train[nearest]).sum(axis=1) / weight.sum(axis=1)


def fit_knn(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, x_eval: np.ndarray,
    ks: tuple[int, ...], temperature: float,
) -> tuple[np.ndarray, dict]:
    """Scores in [0, 1] of ``x_eval`` from cosine k-NN over the training scans, k chosen by validation AUROC.

    Features are (N, C) arrays, labels (N,) 0/1. Returns the scores and ``{"k", "val_auroc", "chosen_on"}``.
    """
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    x_train, x_val, x_eval = unit(x_train), unit(x_val), unit(x_eval)
    y_train = y_train.astype(np.float64)
    choose = len(set(y_val.tolist())) == 2  # AUROC on validation needs both classes there
    candidates = sorted({min(k, len(x_train)) for k in ks})
    best = None
    for k in (candidates if choose else candidates[:1]):
        val_auc = float(auroc(y_val, _knn_scores(x_train, y_train, x_val, k, temperature))) if choose else float("nan")
        if best is None or val_auc > best[0]:
            best = (val_auc, k)
    val_auc, k = best
    return _knn_scores(x_train, y_train, x_eval, k, temperature), {"k": k, "val_auroc": val_auc, "chosen_on": "val" if choose else "default"}


# ------------------------------------------------------------------------------------------- run
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (checkpoints, labels, embeddings), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Cohort:
    """The labelled scans that probe and finetune train and test on, with their splits.

    ``labels`` (n_scans, n_findings) float: 1, 0 or NaN (unknown), row i for ``scan_ids[i]``, column f
    for ``findings[f]``. ``patients``, ``sites`` and ``split`` (train | val | test | ood) are (n_scans,)
    string arrays. ``origin`` is the labels file; ``notes`` say which label rows could not be used.
    """

    scan_ids: list[str]
    findings: list[str]
    labels: np.ndarray
    patients: np.ndarray
    sites: np.ndarray
    split: np.ndarray
    origin: str
    notes: list[str]

    def split_counts(self) -> dict:
        """Scans per split and positives/negatives per finding and split, as run.json records them."""
        scans = {name: int(np.sum(self.split == name)) for name in ("train", "val", "test", "ood")}
        return {"scans_per_split": scans, "labels_per_split": self.label_counts()}

    def label_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Positives and negatives per finding and split: ``{finding: {split: {"pos", "neg"}}}``."""
        counts = {}
        for f, finding in enumerate(self.findings):
            known = ~np.isnan(self.labels[:, f])
            counts[finding] = {
                name: {kind: int(np.sum(self.labels[known & (self.split == name), f] == value)) for kind, value in (("pos", 1), ("neg", 0))}
                for name in ("train", "val", "test", "ood")
            }
        return counts


def load_cohort(
    labels_spec: str,
    available_scan_ids,
    where: str,
    config,
    store_path: str | os.PathLike | None = None,
    rename: dict[str, str] | None = None,
) -> Cohort:
    """The labelled scans among ``available_scan_ids`` (those with features: ``where`` names them in
    messages), split by patient as :func:`fmct.eval.splits.assign_splits` does.

    ``config`` is any config with ``findings``, ``ood_sites``, ``use_split_column``, ``val_fraction``,
    ``test_fraction`` and ``split_seed`` (:class:`ProbeConfig`, ``FinetuneConfig``). Rows keyed by ``source`` need
    ``store_path``, whose manifest also supplies patient keys for rows without a patient_id (without
    either, each scan is its own patient). Bad labels raise ValueError naming the file.
    """
    labels = load_labels(labels_spec, rename)
    notes = list(labels.notes)

    patient_keys: dict[str, str] = {}
    if store_path is not None:
        from fmct.store import Store

        store = Store(store_path)
        patient_keys = {row["scan_id"]: row.get("patient_key", "") for row in store.rows}
        rows, unmatched = match_to_store(labels, store.rows)
        if unmatched:
            notes.append(f"{unmatched} label rows match no scan of the store")
    elif any(not row.get("scan_id") for row in labels.rows):
        raise ValueError(f"{labels.origin}: labels keyed by source need --store to find their scans")
    else:
        rows = labels.rows

    findings = list(config.findings) or labels.findings
    unknown = sorted(set(findings) - set(labels.findings))
    if unknown:
        raise ValueError(f"{labels.origin}: no finding {unknown[0]!r} (findings: {', '.join(labels.findings)})")
    row_of_scan = {}
    for row in rows:
        if row["scan_id"] in row_of_scan:
            raise ValueError(f"{labels.origin}: scan {row['scan_id']} is labelled twice")
        row_of_scan[row["scan_id"]] = row
    available = set(str(s) for s in available_scan_ids)
    scan_ids = [s for s in row_of_scan if s in available]
    if len(scan_ids) < len(row_of_scan):
        notes.append(f"{len(row_of_scan) - len(scan_ids)} labelled scans are not in {where}")
    if not scan_ids:
        raise ValueError(f"{labels.origin}: no labelled scan is in {where}")

    table = [row_of_scan[s] for s in scan_ids]
    y = np.array([[np.nan if r[f] is None else r[f] for f in findings] for r in table], dtype=np.float64)
    # A label's patient ID is an identifier: only its keyed pseudonym goes on, into splits and predictions.
    label_patients = patient_pseudonyms([r.get("patient_id", "") for r in table])
    patients = np.array([p or patient_keys.get(s) or s for p, s in zip(label_patients, scan_ids)])
    sites = np.array([r.get("site", "") for r in table])
    split = assign_splits(
        patients, y, sites, np.array([r.get("split", "") if config.use_split_column else "" for r in table]),
        tuple(config.ood_sites),
        config.val_fraction, config.test_fraction, config.split_seed,
    )
    return Cohort(scan_ids, findings, y, patients, sites, split, labels.origin, notes)


def run_probe(
    embeddings_path: str | os.PathLike,
    labels_spec: str,
    out: str | os.PathLike,
    config: ProbeConfig,
    store_path: str | os.PathLike | None = None,
    rename: dict[str, str] | None = None,
) -> ProbeSummary:
    """Fit the probes and write ``predictions.csv``, ``run.json`` and ``config.yaml`` into ``out``.

    ``labels_spec`` is a labels file as :func:`fmct.datasets.load_labels` reads it. Rows keyed by
    ``source`` need ``store_path``, whose manifest also supplies patient keys for rows without a
    patient_id (without either, each scan is its own patient).
    """
    if config.method not in ("logistic", "knn"):
        raise ValueError(f"probe method {config.method!r}: choose logistic or knn")
    out = Path(out)
    embeddings = read_embeddings(embeddings_path)
    feature = config.features or embeddings.default_feature
    features = embeddings.feature_matrix(feature)
    cohort = load_cohort(labels_spec, embeddings.scan_ids, f"the embeddings {embeddings_path}", config, store_path, rename)
    embedded = {scan_id: i for i, scan_id in enumerate(embeddings.scan_ids)}
    scan_ids, findings, y = cohort.scan_ids, cohort.findings, cohort.labels
    patients, sites, split, notes = cohort.patients, cohort.sites, cohort.split, cohort.notes
    x = features[[embedded[s] for s in scan_ids]]

    model_name = config.model or embeddings.meta.get("model") or Path(embeddings_path).name
    arm = config.arm or embeddings.meta.get("arm") or "pretrained"
    budgets = [(f, None) for f in config.label_fractions] + [(None, n) for n in config.shots]
    predictions, fits, skipped = [], [], []
    progress = tqdm(total=len(findings) * config.seeds * len(budgets), desc="probe", unit="fit", leave=False)
    for f, finding in enumerate(findings):
        known = ~np.isnan(y[:, f])
        train, val = np.flatnonzero(known & (split == "train")), np.flatnonzero(known & (split == "val"))
        evaluated = np.flatnonzero(known & np.isin(split, ("test", "ood")))
        if len(set(y[train, f].tolist())) < 2 or len(evaluated) == 0:
            skipped.append(f"{finding}: the training split needs a positive and a negative, and a test scan must exist")
            progress.update(config.seeds * len(budgets))
            continue
        for seed in range(config.seeds):
            for fraction, shots in budgets:
                subset = train[training_subset(y[train, f], seed, finding, fraction=fraction, shots=shots)]
                if config.method == "logistic":
                    scores, chosen = fit_logistic(x[subset], y[subset, f], x[val], y[val, f], x[evaluated], config.c_grid)
                else:
                    scores, chosen = fit_knn(x[subset], y[subset, f], x[val], y[val, f], x[evaluated], config.knn_k, config.knn_temperature)
                fits.append({
                    "finding": finding, "seed": seed, "label_fraction": fraction, "shots": shots,
                    "n_train_pos": int(np.sum(y[subset, f] == 1)), "n_train_neg": int(np.sum(y[subset, f] == 0)), **chosen,
                })
                for i, score in zip(evaluated, scores):
                    predictions.append({
                        "scan_id": scan_ids[i], "patient_id": patients[i], "site": sites[i], "split": split[i],
                        "finding": finding, "label": int(y[i, f]), "score": float(score), "model": model_name, "arm": arm,
                        "label_fraction": "" if fraction is None else fraction, "seed": seed, "shots": "" if shots is None else shots,
                    })
                progress.update()
    progress.close()

    npz = Path(embeddings_path) / "embeddings.npz" if Path(embeddings_path).is_dir() else Path(embeddings_path)
    run = {
        "command": "probe",
        "config": to_dict(config),
        "model": model_name,
        "arm": arm,
        "features": feature,
        "embeddings": {"path": str(npz), "sha256": file_sha256(npz), "meta": embeddings.meta},
        "labels": {"spec": labels_spec, "sha256": file_sha256(Path(cohort.origin)), "notes": notes},
        "store": None if store_path is None else str(store_path),
        **cohort.split_counts(),
        "fits": fits,
        "skipped": skipped,
    }
    save_config(config, out / "config.yaml")
    write_predictions(out, predictions, run)
    return ProbeSummary(len(predictions), [f for f in findings if not any(s.startswith(f + ":") for s in skipped)], skipped, notes)
