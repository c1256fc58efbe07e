"""Learning seen while it happens: the teacher backbone probed on a labelled validation subset during
pretraining, every ``online_eval.every`` steps (and once before the first step, the random-init
reference).

What a line of ``log.jsonl`` then holds besides the loss terms:

- ``online_rankme``: RankMe (Garrido et al. 2023), ``exp`` of the entropy of the normalised singular
  values of the (scans x embed_dim) CLS matrix: the embedding's effective rank, 1 for a representation
  that maps every scan alike, up to embed_dim; it needs no labels.
- ``online_knn_auroc_<finding>``: AUROC of cosine k-NN (k = ``online_eval.knn_k``) on the CLS token
  (DINO's k-NN monitor), fitted on one half of the validation scans and scored on the other half, split
  by patient.
- ``online_linear_auroc_<finding>``: AUROC on the same scored half of ``fmct probe``'s default probe: the
  logistic probe of :mod:`fmct.eval.classifiers` on the feature set ``auto`` chooses
  (:func:`fmct.eval.classifiers.choose_features` over :data:`fmct.eval.embeddings.AUTO_CANDIDATES`, C
  from :data:`fmct.eval.classifiers.C_GRID`, one choice for all findings by their mean validation
  AUROC). Its validation split is a third of the fitting half's patients (:data:`CHOOSE_FRACTION`),
  held out of the fit; the scored half never takes part in the choice.

Scans whose labels file puts them in the ``test`` split, and scans of sites kept out of pretraining
(``data.exclude_sites``), are never used. Features are those of each whole volume resized to the model
input, exactly as ``fmct embed`` computes them (:func:`fmct.models.encode.encode`: ``cls``,
``patch_mean``, ``patch_max``), so the online figures predict what a probe will see.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fmct.data import StoreVolumes
from fmct.datasets import load_labels, match_to_store
from fmct.errors import InputError
from fmct.eval.classifiers import C_GRID, LogisticProbe, choose_features, fit_knn, fit_logistic_probe
from fmct.eval.embeddings import AUTO, Embeddings
from fmct.eval.metrics import auroc
from fmct.eval.splits import assign_splits
from fmct.log import logger
from fmct.models import ViT3D
from fmct.models.encode import encode, feature_names
from fmct.models.windows import model_input
from fmct.store import Store

# A finding is scored only when each half holds at least this many positives and negatives (and the
# linear probe's fitting part, the fitting half less its validation split, at least one of each).
MIN_PER_CLASS = 3
CHOOSE_FRACTION = 1 / 3  # share of the fitting half's patients that choose the linear probe's features and C


def rankme(features: np.ndarray) -> float:
    """Effective rank of a (n_scans, dim) feature matrix: ``exp(-sum p_k log p_k)`` with
    ``p_k = s_k / sum(s)`` over its singular values ``s`` (plus 1e-7, as in RankMe).

    Example: the rows of a 4 x 4 identity have 4 equal singular values, so RankMe is 4.0; four equal
    rows have one non-zero singular value, so RankMe is (close to) 1.0.
    """
    singular = np.linalg.svd(np.asarray(features, dtype=np.float64), compute_uv=False)
    p = singular / singular.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


class OnlineEvaluator:
    """The labelled validation volumes of a run, held in memory, and the probes that score a backbone on them.

    ``store``: the labelled store (int16 HU volumes); ``labels``: a labels spec for it (empty: no labels,
    RankMe only); ``findings``: which to score (empty: all with enough positives); ``max_scans``: at most
    this many scans (the first by scan id), to bound memory and time; ``excluded_sites``: sites never
    used; ``windows``: the (level, width) HU windows of the model input.

    Per held scan (``scan_ids``): ``labels`` (n, F) (NaN unknown), ``half`` (``train`` fits, ``val`` is
    scored; by patient) and ``choose`` (bool: in the linear probe's validation split, inside the ``train``
    half); ``scored``: the (column, finding) pairs with enough labels in each part.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        labels: str,
        findings: Sequence[str],
        max_scans: int,
        knn_k: int,
        excluded_sites: Sequence[str],
        windows: Sequence[tuple[float, float]],
        device: torch.device,
        batch_size: int = 16,
    ):
        self.windows, self.device, self.batch_size, self.knn_k = list(windows), device, batch_size, knn_k
        store = Store(store)
        scan_ids, all_findings = sorted(store.scan_ids), []
        labels_table, half, choose = (
            np.zeros((len(scan_ids), 0)),
            np.full(len(scan_ids), ""),
            np.zeros(len(scan_ids), bool),
        )
        if labels:
            scan_ids, labels_table, half, choose, all_findings = _validation_labels(
                store, labels, findings, excluded_sites
            )
        volumes = StoreVolumes(store, scan_ids[:max_scans])
        # Scans of another grid are left out by StoreVolumes: keep the label rows of the scans it kept.
        row_of = {scan_id: i for i, scan_id in enumerate(scan_ids)}
        kept = [row_of[scan_id] for scan_id in volumes.scan_ids]
        self.scan_ids, self.labels, self.half, self.choose = (
            volumes.scan_ids,
            labels_table[kept],
            half[kept],
            choose[kept],
        )
        self.hu = torch.stack([volumes[i][0] for i in range(len(volumes))])  # (N, 1, X, Y, Z) int16
        self.scored = [(column, f) for column, f in enumerate(all_findings) if self._scorable(column)]

    def _scorable(self, column: int) -> bool:
        y = self.labels[:, column]
        linear_fit = (self.half == "train") & ~self.choose
        return all(
            int(np.sum(y[self.half == half] == value)) >= MIN_PER_CLASS for half in ("train", "val") for value in (0, 1)
        ) and set(y[linear_fit].tolist()) >= {0.0, 1.0}

    def describe(self) -> str:
        """One line: what the online evaluation scores."""
        scored = ", ".join(f for _, f in self.scored) if self.scored else "no finding (RankMe only)"
        return f"online evaluation on {len(self.scan_ids)} validation scans: {scored}"

    def __call__(self, backbone: ViT3D) -> dict[str, float]:
        """RankMe of ``backbone``'s CLS features and, per scored finding, the k-NN and linear AUROC (see the
        module doc): :meth:`evaluate` of :meth:`features`."""
        return self.evaluate(self.features(backbone))

    @torch.no_grad()
    def features(self, backbone: ViT3D) -> Embeddings:
        """The features of the held scans under ``backbone`` (:func:`fmct.models.encode.encode`, as ``fmct
        embed`` writes them), row i for ``scan_ids[i]``; the backbone's train/eval mode is kept."""
        was_training = backbone.training
        backbone.eval()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in feature_names(backbone)}
        for start in range(0, len(self.hu), self.batch_size):
            x = model_input(
                self.hu[start : start + self.batch_size].to(self.device), backbone.config.img_size, self.windows
            )
            for name, values in encode(backbone, x).items():
                parts[name].append(values.cpu().numpy())
        backbone.train(was_training)
        return Embeddings(np.asarray(self.scan_ids), {name: np.concatenate(values) for name, values in parts.items()})

    def evaluate(self, features: Embeddings) -> dict[str, float]:
        """RankMe and per scored finding the k-NN and linear AUROC of ``features`` (of :attr:`scan_ids`,
        in that order); NaN where a figure is not finite."""
        cls = features.feature_matrix("cls")
        metrics = {"online_rankme": rankme(cls)}
        fit, score = self.half == "train", self.half == "val"
        known = {finding: ~np.isnan(self.labels[:, column]) for column, finding in self.scored}
        y = {finding: self.labels[:, column] for column, finding in self.scored}
        for finding in known:
            rows_fit, rows_score = fit & known[finding], score & known[finding]
            knn, _ = fit_knn(
                cls[rows_fit], y[finding][rows_fit], cls[:0], y[finding][:0], cls[rows_score], (self.knn_k,), 0.07
            )
            metrics[f"online_knn_auroc_{finding}"] = float(auroc(y[finding][rows_score], knn))

        linear_fit = fit & ~self.choose  # the fitting half less the linear probe's validation split

        def fit_linear(x: np.ndarray) -> list[LogisticProbe]:
            return [
                fit_logistic_probe(
                    x[linear_fit & known[f]],
                    y[f][linear_fit & known[f]],
                    x[self.choose & known[f]],
                    y[f][self.choose & known[f]],
                    C_GRID,
                )
                for f in known
            ]

        candidates, _ = features.candidates(AUTO)
        choice = choose_features(candidates, fit_linear, lambda probe: probe.info["val_auroc"])
        for finding, probe in zip(known, choice.fits):
            rows_score = score & known[finding]
            linear = probe.decision_function(candidates[choice.name][rows_score])
            metrics[f"online_linear_auroc_{finding}"] = float(auroc(y[finding][rows_score], linear))
        return {name: value if math.isfinite(value) else float("nan") for name, value in metrics.items()}


def _validation_labels(store: Store, labels_spec: str, findings: Sequence[str], excluded_sites: Sequence[str]):
    """Scan ids, labels (n, F), patient-level halves (``train`` fits, ``val`` scores), the linear probe's
    validation split (n,) bool (:data:`CHOOSE_FRACTION` of the ``train`` half's patients) and findings of
    the labelled scans of ``store`` outside the test split and the excluded sites."""
    labels = load_labels(labels_spec)
    rows, _ = match_to_store(labels, store.rows)
    patient_keys = {row["scan_id"]: row.get("patient_key", "") for row in store.rows}
    rows = [row for row in rows if row.get("split") != "test" and row.get("site", "") not in set(excluded_sites)]
    rows.sort(key=lambda row: row["scan_id"])
    unknown = sorted(set(findings) - set(labels.findings))
    if unknown:
        raise InputError(f"{labels.origin}: no finding {unknown[0]!r} (findings: {', '.join(labels.findings)})")
    findings = list(findings) or labels.findings
    if not rows:
        raise InputError(f"{labels.origin}: no labelled scan of {store.path} outside the test split")
    y = np.array([[np.nan if row[f] is None else row[f] for f in findings] for row in rows], dtype=np.float64)
    patients = np.array([row.get("patient_id") or patient_keys.get(row["scan_id"]) or row["scan_id"] for row in rows])
    half = assign_splits(patients, y, val_fraction=0.5, test_fraction=0.0, seed=0)
    fitting = np.flatnonzero(half == "train")
    choose = np.zeros(len(rows), bool)
    choose[fitting] = (
        assign_splits(patients[fitting], y[fitting], val_fraction=CHOOSE_FRACTION, test_fraction=0.0, seed=0) == "val"
    )
    return [row["scan_id"] for row in rows], y, half, choose, findings


def build_online_evaluator(config, pretrain_store: Path, device: torch.device) -> OnlineEvaluator | None:
    """The evaluator a :class:`~fmct.ssl.config.PretrainConfig` asks for, or None when ``online_eval.every`` is 0."""
    online = config.online_eval
    if online.every <= 0:
        return None
    evaluator = OnlineEvaluator(
        online.store or pretrain_store,
        online.labels,
        online.findings,
        online.max_scans,
        online.knn_k,
        config.data.exclude_sites,
        config.augment.windows,
        device,
    )
    logger.info(f"pretrain: {evaluator.describe()}")
    return evaluator
