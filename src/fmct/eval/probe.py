"""Probes on frozen embeddings (``fmct probe``): one binary classifier per finding, label budget and seed.

Methods:
- ``logistic``: L2-regularised logistic regression on standardised features (scikit-learn); the inverse
  regularisation C is chosen on the validation split by AUROC over ``c_grid`` (the smaller C wins a tie).
- ``knn``: cosine k-nearest neighbours; score = the exp(similarity / T)-weighted share of positives among
  the k nearest training scans (T = 0.07 as DINO's k-NN evaluation); k chosen on validation by AUROC.

The attentive probe over patch tokens needs the tokens themselves, which the embeddings table does not
hold; it belongs with ``finetune``.

The labelled cohort, its splits and label budgets are :mod:`fmct.eval.cohort`'s; validation always
uses every labelled validation scan.
The scores of the test (``test``) and held-out-site (``ood``) scans go to ``predictions.csv`` in the
format of :mod:`fmct.eval.evaluate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fmct.config import save_config, to_dict
from fmct.errors import ConfigError
from fmct.eval.classifiers import fit_knn, fit_logistic
from fmct.eval.cohort import Budget, Cohort, CohortConfig, FitSummary, load_cohort
from fmct.eval.embeddings import Embeddings, read_embeddings
from fmct.eval.evaluate import write_predictions
from fmct.fingerprint import file_sha256

METHODS = ("logistic", "knn")


@dataclass
class ProbeConfig(CohortConfig):
    method: str = "logistic"  # logistic | knn
    features: str = ""  # cls | patch_mean | concat (a backbone's), first_order (the HU histogram's); empty: the table's default
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    knn_k: tuple[int, ...] = (5, 10, 20, 50)
    knn_temperature: float = 0.07
    model: str = ""  # name in the predictions; empty: the embeddings' meta "model", else the folder name
    arm: str = ""  # e.g. pretrained | scratch; empty: the embeddings' meta "arm", else "pretrained"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"probe method {self.method!r}: choose {' or '.join(METHODS)}")


def run_probe(
    embeddings_path: str | os.PathLike,
    labels_spec: str,
    out: str | os.PathLike,
    config: ProbeConfig,
    store_path: str | os.PathLike | None = None,
    rename: dict[str, str] | None = None,
) -> FitSummary:
    """Fit the probes and write ``predictions.csv``, ``run.json`` and ``config.yaml`` into ``out``.

    ``labels_spec`` is a labels file as :func:`fmct.datasets.load_labels` reads it. Rows keyed by
    ``source`` need ``store_path``, whose manifest also supplies patient keys for rows without a
    patient_id (without either, each scan is its own patient).
    """
    out = Path(out)
    embeddings = read_embeddings(embeddings_path)
    feature = config.features or embeddings.default_feature
    cohort = load_cohort(labels_spec, embeddings.scan_ids, f"the embeddings {embeddings_path}", config, store_path, rename)
    embedded = {scan_id: i for i, scan_id in enumerate(embeddings.scan_ids)}
    x = embeddings.feature_matrix(feature)[[embedded[s] for s in cohort.scan_ids]]
    model_name = config.model or embeddings.meta.get("model") or Path(embeddings_path).name
    arm = config.arm or embeddings.meta.get("arm") or "pretrained"

    trainable = [f for f in range(len(cohort.findings)) if cohort.untrainable_reason(f) is None]
    skipped = [cohort.untrainable_reason(f) for f in range(len(cohort.findings)) if f not in trainable]
    budgets = config.budgets()
    predictions, fits = [], []
    with tqdm(total=len(trainable) * config.seeds * len(budgets), desc="probe", unit="fit", leave=False) as progress:
        for f in trainable:
            for seed in range(config.seeds):
                for budget in budgets:
                    fit, rows = _fit_one(x, cohort, f, budget, seed, config)
                    fits.append(fit)
                    predictions += [cohort.prediction(i, f, score, model_name, arm, budget, seed) for i, score in rows]
                    progress.update()

    run = {
        "command": "probe", "config": to_dict(config), "model": model_name, "arm": arm, "features": feature,
        "embeddings": _embeddings_record(embeddings_path, embeddings),
        "labels": {"spec": labels_spec, "sha256": file_sha256(Path(cohort.origin)), "notes": cohort.notes},
        "store": None if store_path is None else str(store_path),
        **cohort.split_counts(), "fits": fits, "skipped": skipped,
    }
    save_config(config, out / "config.yaml")
    write_predictions(out, predictions, run)
    return FitSummary("probe", len(predictions), [cohort.findings[f] for f in trainable], len(fits),
                      skipped=skipped, notes=cohort.notes)


def _fit_one(x: np.ndarray, cohort: Cohort, finding: int, budget: Budget, seed: int,
             config: ProbeConfig) -> tuple[dict, list[tuple[int, float]]]:
    """One probe of ``finding`` on the training subset of (``budget``, ``seed``): its fit record and the
    (cohort row, score) of every evaluated scan."""
    f, y = finding, cohort.labels
    subset, val, evaluated = cohort.training_rows(f, budget, seed), cohort.rows(f, ("val",)), cohort.rows(f, ("test", "ood"))
    if config.method == "logistic":
        scores, chosen = fit_logistic(x[subset], y[subset, f], x[val], y[val, f], x[evaluated], config.c_grid)
    else:
        scores, chosen = fit_knn(x[subset], y[subset, f], x[val], y[val, f], x[evaluated], config.knn_k, config.knn_temperature)
    fit = {"finding": cohort.findings[f], "seed": seed, "label_fraction": budget.fraction, "shots": budget.shots,
           "n_train_pos": int(np.sum(y[subset, f] == 1)), "n_train_neg": int(np.sum(y[subset, f] == 0)), **chosen}
    return fit, list(zip(evaluated.tolist(), scores))


def _embeddings_record(embeddings_path: str | os.PathLike, embeddings: Embeddings) -> dict:
    npz = Path(embeddings_path) / "embeddings.npz" if Path(embeddings_path).is_dir() else Path(embeddings_path)
    return {"path": str(npz), "sha256": file_sha256(npz), "meta": embeddings.meta}
