"""Learning seen while it happens: the teacher backbone probed on a labelled validation subset during
pretraining, every ``online_eval.every`` steps (and once before the first step, the random-init
reference).

What a line of ``log.jsonl`` then holds besides the loss terms:

- ``online_rankme``: RankMe (Garrido et al. 2023), ``exp`` of the entropy of the normalised singular
  values of the (scans x embed_dim) CLS matrix: the embedding's effective rank, 1 for a representation
  that maps every scan alike, up to embed_dim; it needs no labels.
- ``online_knn_auroc_<finding>``: cosine k-NN (k = ``online_eval.knn_k``) AUROC, and
  ``online_linear_auroc_<finding>``: AUROC of an L2 logistic regression (C = 1 on standardised
  features), both fitted on one half of the validation scans and scored on the other half, split by
  patient. Scans whose labels file puts them in the ``test`` split, and scans of sites kept out of
  pretraining (``data.exclude_sites``), are never used.

Features are the CLS token of each whole volume resized to the model input, exactly as ``fmct embed``
computes them (:func:`fmct.eval.embed.encode`), so the online figures predict what a probe will see.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fmct.data import StoreVolumes
from fmct.datasets import load_labels, match_to_store
from fmct.eval.metrics import auroc
from fmct.eval.classifiers import fit_knn, fit_logistic
from fmct.eval.splits import assign_splits
from fmct.models import ViT3D
from fmct.models.encode import encode
from fmct.store import Store
from fmct.errors import InputError

# A finding is scored only when each half holds at least this many positives and negatives.
MIN_PER_CLASS = 3


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
    """

    def __init__(self, store: str | os.PathLike, labels: str, findings: Sequence[str], max_scans: int, knn_k: int,
                 excluded_sites: Sequence[str], windows: Sequence[tuple[float, float]], device: torch.device,
                 batch_size: int = 16):
        self.windows, self.device, self.batch_size, self.knn_k = list(windows), device, batch_size, knn_k
        store = Store(store)
        scan_ids, all_findings = sorted(store.scan_ids), []
        labels_table, half = np.zeros((len(scan_ids), 0)), np.full(len(scan_ids), "")
        if labels:
            scan_ids, labels_table, half, all_findings = _validation_labels(store, labels, findings, excluded_sites)
        volumes = StoreVolumes(store, scan_ids[:max_scans])
        # Scans of another grid are left out by StoreVolumes: keep the label rows of the scans it kept.
        row_of = {scan_id: i for i, scan_id in enumerate(scan_ids)}
        kept = [row_of[scan_id] for scan_id in volumes.scan_ids]
        self.scan_ids, self.labels, self.half = volumes.scan_ids, labels_table[kept], half[kept]
        self.hu = torch.stack([volumes[i][0] for i in range(len(volumes))])  # (N, 1, X, Y, Z) int16
        self.scored = [(column, f) for column, f in enumerate(all_findings) if self._scorable(column)]

    def _scorable(self, column: int) -> bool:
        y = self.labels[:, column]
        return all(int(np.sum(y[self.half == half] == value)) >= MIN_PER_CLASS
                   for half in ("train", "val") for value in (0, 1))

    def describe(self) -> str:
        """One line: what the online evaluation scores."""
        scored = ", ".join(f for _, f in self.scored) if self.scored else "no finding (RankMe only)"
        return f"online evaluation on {len(self.scan_ids)} validation scans: {scored}"

    @torch.no_grad()
    def __call__(self, backbone: ViT3D) -> dict[str, float]:
        """RankMe and per-finding k-NN / linear AUROC of ``backbone``'s CLS features (see the module doc)."""
        was_training = backbone.training
        backbone.eval()
        features = []
        for start in range(0, len(self.hu), self.batch_size):
            cls, _ = encode(backbone, self.hu[start:start + self.batch_size].to(self.device), self.windows)
            features.append(cls.cpu().numpy())
        backbone.train(was_training)
        x = np.concatenate(features).astype(np.float64)
        metrics = {"online_rankme": rankme(x)}
        fit, score = self.half == "train", self.half == "val"
        empty = x[:0]
        for column, finding in self.scored:
            y = self.labels[:, column]
            known_fit, known_score = fit & ~np.isnan(y), score & ~np.isnan(y)
            y_fit, y_score = y[known_fit].astype(int), y[known_score].astype(int)
            knn, _ = fit_knn(x[known_fit], y_fit, empty, y_fit[:0], x[known_score], (self.knn_k,), 0.07)
            linear, _ = fit_logistic(x[known_fit], y_fit, empty, y_fit[:0], x[known_score], (1.0,))
            metrics[f"online_knn_auroc_{finding}"] = float(auroc(y_score, knn))
            metrics[f"online_linear_auroc_{finding}"] = float(auroc(y_score, linear))
        return {name: value if math.isfinite(value) else float("nan") for name, value in metrics.items()}


def _validation_labels(store: Store, labels_spec: str, findings: Sequence[str], excluded_sites: Sequence[str]):
    """Scan ids, labels (n, F), patient-level halves (``train`` fits, ``val`` scores) and findings of the
    labelled scans of ``store`` outside the test split and the excluded sites."""
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
    return [row["scan_id"] for row in rows], y, half, findings


def build_online_evaluator(config, pretrain_store: Path, device: torch.device) -> OnlineEvaluator | None:
    """The evaluator a :class:`~fmct.ssl.config.PretrainConfig` asks for, or None when ``online_eval.every`` is 0."""
    online = config.online_eval
    if online.every <= 0:
        return None
    evaluator = OnlineEvaluator(online.store or pretrain_store, online.labels, online.findings, online.max_scans,
                                online.knn_k, config.data.exclude_sites, config.augment.windows, device)
    print(f"pretrain: {evaluator.describe()}", file=sys.stderr)
    return evaluator
