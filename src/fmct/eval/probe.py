"""Probes on frozen embeddings (``fmct probe``): one binary classifier per finding, label budget and seed.

Methods:
- ``logistic``: L2-regularised logistic regression on standardised features (scikit-learn); the inverse
  regularisation C is chosen on the validation split by AUROC over ``c_grid`` (the smaller C wins a tie).
- ``knn``: cosine k-nearest neighbours; score = the exp(similarity / T)-weighted share of positives among
  the k nearest training scans (T = 0.07 as DINO's k-NN evaluation); k chosen on validation by AUROC.

Features (``features``, :mod:`fmct.eval.embeddings`): one feature set of a backbone's table (``cls``,
``patch_mean``, ``patch_max``, ``concat``, ``cls_mean_max``) or the HU histogram's ``first_order``; by
default the table's own: ``auto`` for a backbone's. ``auto`` fits every candidate set (``cls``,
``concat``, ``cls_mean_max``) per label budget and seed, all findings with their usual C (or k) search on
the training subset, and keeps the set whose fits have the best mean validation AUROC over the findings
(:func:`fmct.eval.classifiers.choose_features`; a tie keeps the smaller set). The choice is per (budget,
seed) fit, made on the validation split only; each fit record of ``run.json`` and each detector folder
record the chosen set, which ``fmct predict`` rebuilds.

The attentive probe over patch tokens needs the tokens themselves, which the embeddings table does not
hold; it belongs with ``finetune``.

The labelled cohort, its splits and label budgets are :mod:`fmct.eval.cohort`'s; validation always
uses every labelled validation scan.
The scores of the test (``test``) and held-out-site (``ood``) scans go to ``predictions.csv`` in the
format of :mod:`fmct.eval.evaluate`. Every logistic fit of a backbone's embeddings is also saved as a
detector folder, ``OUT/fits/<budget>-seed<k>/`` (:mod:`fmct.detector`: all findings of that budget and
seed, thresholds and calibration set on the validation split), which ``fmct predict`` runs on new scans.
k-NN fits and the floors' embeddings are not saved as detectors (see :mod:`fmct.detector`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmct import detector, hub, saliency
from fmct.config import save_config, to_dict
from fmct.errors import CheckpointError, ConfigError, InputError
from fmct.eval import calibration
from fmct.eval.classifiers import C_GRID, LogisticProbe, choose_features, fit_knn, fit_logistic_probe
from fmct.eval.cohort import EVALUATED_SPLITS, Budget, Cohort, CohortConfig, FitSummary, load_cohort
from fmct.eval.embeddings import AUTO, Embeddings, read_embeddings
from fmct.eval.evaluate import write_predictions
from fmct.fingerprint import file_sha256
from fmct.log import progress_bar
from fmct.paths import located, relative_to
from fmct.store import store_identity

METHODS = ("logistic", "knn")


@dataclass
class ProbeConfig(CohortConfig):
    method: str = "logistic"  # logistic | knn
    # auto | cls | patch_mean | patch_max | concat | cls_mean_max (a backbone's), first_order (the HU
    # histogram's); empty: the table's default (auto for a backbone's)
    features: str = ""
    c_grid: tuple[float, ...] = C_GRID
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
    saliency_examples: int = 0,
) -> FitSummary:
    """Fit the probes and write ``predictions.csv``, ``run.json`` and ``config.yaml`` into ``out``.

    ``saliency_examples`` N > 0: saliency PNGs of the N highest-scoring true and false positives per finding
    and site group of the detector ``fmct predict`` would take, for ``fmct report``
    (:func:`fmct.saliency.write_examples`; needs a saved detector and its store).

    ``labels_spec`` is a labels file as :func:`fmct.datasets.load_labels` reads it. Rows keyed by
    ``source`` need ``store_path``, whose manifest also supplies patient keys for rows without a
    patient_id (without either, each scan is its own patient).
    """
    out = Path(out)
    embeddings = read_embeddings(embeddings_path)
    feature = config.features or embeddings.default_feature
    candidates, candidates_note = embeddings.candidates(feature)
    cohort = load_cohort(
        labels_spec, embeddings.scan_ids, f"the embeddings {embeddings_path}", config, store_path, rename
    )
    row_of = {scan_id: i for i, scan_id in enumerate(embeddings.scan_ids)}
    embedded = [row_of[s] for s in cohort.scan_ids]
    candidates = {name: x[embedded] for name, x in candidates.items()}  # row i: cohort scan i
    model_name = config.model or embeddings.meta.get("model") or Path(embeddings_path).name
    arm = config.arm or embeddings.meta.get("arm") or "pretrained"

    trainable = [f for f in range(len(cohort.findings)) if cohort.untrainable_reason(f) is None]
    skipped = [cohort.untrainable_reason(f) for f in range(len(cohort.findings)) if f not in trainable]
    budgets = config.budgets()
    labels_record = {"spec": labels_spec, "sha256": file_sha256(Path(cohort.origin))}
    folder = Path(embeddings_path) if Path(embeddings_path).is_dir() else Path(embeddings_path).parent
    store = store_path or (located(embeddings.meta["store"], folder) if embeddings.meta.get("store") else None)
    target, no_detector = _detector_target(embeddings, folder, feature, config, store)
    notes = cohort.notes + [
        note for note in (no_detector and f"no detector folders: {no_detector}", candidates_note) if note
    ]
    _remove_earlier_detectors(out)
    predictions, fits, n_detectors = [], [], 0
    with progress_bar(
        total=len(trainable) * config.seeds * len(budgets), desc="probe", unit="fit", leave=False
    ) as progress:
        for seed in config.seed_range():
            for budget in budgets:
                choice = choose_features(
                    candidates,
                    lambda x: [_fit_one(x, cohort, f, budget, seed, config) for f in trainable],
                    lambda one: one[0]["val_auroc"],
                )
                models, finding_fits = {}, {}
                for f, (fit, finding_fits[f], models[f]) in zip(trainable, choice.fits):
                    fits.append({**fit, **choice.record()})
                progress.update(len(trainable))
                # Thresholds and calibration set on validation, for the predictions and the detector alike.
                summary = calibration.summarise_fit(cohort, finding_fits)
                for f, finding_fit in finding_fits.items():
                    predictions += [
                        {
                            **cohort.prediction(i, f, score, model_name, arm, budget, seed),
                            **calibration.prediction_columns(summary, cohort.findings[f], score),
                        }
                        for i, score in zip(finding_fit.eval_rows.tolist(), finding_fit.eval_scores)
                    ]
                if target is not None:
                    n_detectors += _save_detector(
                        out / detector.FITS_DIR / f"{budget.name}-seed{seed}",
                        target,
                        choice.record(),
                        cohort,
                        models,
                        summary,
                        budget,
                        seed,
                        config,
                        labels_record,
                        store,
                    )

    run = {
        "command": "probe",
        "config": to_dict(config),
        "model": model_name,
        "arm": arm,
        "features": feature,
        "embeddings": _embeddings_record(embeddings_path, embeddings),
        "labels": {**labels_record, "notes": notes},
        "store": None if store_path is None else relative_to(store_path, out),
        **cohort.split_counts(),
        "fits": fits,
        "skipped": skipped,
        "detectors": n_detectors,
    }
    save_config(config, out / "config.yaml")
    write_predictions(out, predictions, run)
    if saliency_examples and n_detectors:
        saliency.write_examples(out, predictions, store, saliency_examples)
    elif saliency_examples:
        notes.append("no saliency examples: no detector was saved")
    return FitSummary(
        "probe", len(predictions), [cohort.findings[f] for f in trainable], len(fits), skipped=skipped, notes=notes
    )


def _fit_one(
    x: np.ndarray, cohort: Cohort, finding: int, budget: Budget, seed: int, config: ProbeConfig
) -> tuple[dict, calibration.FindingFit, LogisticProbe | None]:
    """One probe of ``finding`` on the training subset of (``budget``, ``seed``): its fit record, its
    scores of the validation and evaluated scans, and the fitted logistic model (None for k-NN)."""
    f, y = finding, cohort.labels
    subset, val, evaluated = (
        cohort.training_rows(f, budget, seed),
        cohort.rows(f, ("val",)),
        cohort.rows(f, EVALUATED_SPLITS),
    )
    model = None
    if config.method == "logistic":
        model = fit_logistic_probe(x[subset], y[subset, f], x[val], y[val, f], config.c_grid)
        val_scores, scores, chosen = model.decision_function(x[val]), model.decision_function(x[evaluated]), model.info
    else:
        both, chosen = fit_knn(
            x[subset],
            y[subset, f],
            x[val],
            y[val, f],
            np.concatenate([x[val], x[evaluated]]),
            config.knn_k,
            config.knn_temperature,
        )
        val_scores, scores = both[: len(val)], both[len(val) :]
    fit = {
        "finding": cohort.findings[f],
        "seed": seed,
        "label_fraction": budget.fraction,
        "shots": budget.shots,
        "n_train_pos": int(np.sum(y[subset, f] == 1)),
        "n_train_neg": int(np.sum(y[subset, f] == 0)),
        **chosen,
    }
    return fit, calibration.FindingFit(subset, val, val_scores, evaluated, scores), model


def _remove_earlier_detectors(out: Path) -> None:
    """Remove the probe detectors an earlier run left in ``out/fits/``: this run replaces its predictions,
    and a fit of other settings must not be picked for ``--model out``."""
    for folder in sorted((out / detector.FITS_DIR).glob("*")):
        if detector.is_detector(folder) and detector.read_detector_config(folder)["kind"] == "probe":
            shutil.rmtree(folder)


def _detector_target(
    embeddings: Embeddings, embeddings_folder: Path, feature: str, config: ProbeConfig, store: str | os.PathLike | None
) -> tuple[dict | None, str]:
    """What every detector of this run shares (backbone reference, windows, input size, grid; not the
    feature set, which ``auto`` chooses per fit), or None and the reason no detector can be saved."""
    model_path = embeddings.meta.get("model_path")
    if config.method != "logistic":
        return None, "k-NN probes are not saved as detectors (they would carry the training scans' features)"
    if not model_path:
        return None, "the embeddings are not of a model folder's backbone (the floors are baselines, not detectors)"
    if feature != AUTO and feature not in detector.PROBE_FEATURES:
        return None, f"feature {feature!r} is not a backbone's"
    if store is None or not Path(store).is_dir():
        return None, f"the store the embeddings were made from is not found ({store or 'not recorded'}); pass --store"
    recorded = located(model_path, embeddings_folder)  # a shipped model is recorded by its name
    try:
        source = hub.resolve_model(recorded if recorded.exists() else model_path)
    except CheckpointError as error:
        return None, f"the embeddings' backbone cannot be loaded: {error}"
    if embeddings.meta.get("checkpoint_sha256") and source.sha256 != embeddings.meta["checkpoint_sha256"]:
        return None, f"the backbone {model_path} changed since the embeddings were made (sha256 differs)"
    try:
        grid = detector.store_grid(store)
    except InputError as error:
        return None, str(error)
    return {
        "backbone": detector.backbone_reference(source),
        "windows_hu": [list(w) for w in source.windows],
        "input_size": list(source.config.img_size),
        **grid,
    }, ""


def _save_detector(
    folder: Path,
    target: dict,
    choice: dict,
    cohort: Cohort,
    models: dict[int, LogisticProbe],
    summary: dict,
    budget: Budget,
    seed: int,
    config: ProbeConfig,
    labels_record: dict,
    store: str | os.PathLike,
) -> int:
    """Save the logistic fits of one (budget, seed) (``summary``: :func:`fmct.calibration.summarise_fit` of
    them; ``choice``: :meth:`FeatureChoice.record` of their feature set) as a detector folder whose
    ``feature`` is the chosen set; 1 when saved, 0 when no finding could be calibrated (its validation
    split lacks a class)."""
    kept = [f for f in models if cohort.findings[f] in summary["per_finding"]]
    if not kept:
        return 0
    findings = [cohort.findings[f] for f in kept]
    head = {
        name: torch.tensor(np.stack([getattr(models[f], name) for f in kept]), dtype=torch.float32)
        for name in ("mean", "scale", "coef")
    }
    head["intercept"] = torch.tensor([models[f].intercept for f in kept], dtype=torch.float32)
    provenance = {
        "verb": "probe",
        "labels": labels_record,
        "store": store_identity(store),
        "synthetic": cohort.synthetic,
        "seed": seed,
        "budget": {"label_fraction": budget.fraction, "shots": budget.shots},
        "scans_per_split": cohort.split_counts()["scans_per_split"],
        "ood_sites": list(config.ood_sites),
        "n_train": summary["n_train"],
        "metrics": summary["metrics"],
        "recipe": {
            "method": "logistic",
            **choice,
            "C": {cohort.findings[f]: models[f].info["C"] for f in kept},
            "split_seed": config.split_seed,
        },
    }
    detector.write_detector(
        folder,
        {
            "kind": "probe",
            "head": "logistic",
            "feature": choice["features"],
            "findings": findings,
            "scorer_outputs": findings,
            **target,
            "per_finding": summary["per_finding"],
            "left_out": summary["left_out"],
            "provenance": provenance,
        },
        head,
    )
    return 1


def _embeddings_record(embeddings_path: str | os.PathLike, embeddings: Embeddings) -> dict:
    npz = Path(embeddings_path) / "embeddings.npz" if Path(embeddings_path).is_dir() else Path(embeddings_path)
    return {"path": str(npz), "sha256": file_sha256(npz), "meta": embeddings.meta}
