"""Binary detection metrics with patient-level bootstrap CIs and DeLong's test (numpy/scipy only).

Every metric is computed from *weighted* counts, so one code path serves the point estimate (all
weights 1) and every bootstrap replicate (weight = how often the scan's patient was drawn). Weights
have shape (n,) or (R, n) for R replicates at once; results then have shape () or (R,).

Conventions, used everywhere in fmct:
- ``labels`` are 0/1, ``scores`` are real numbers, higher = more likely positive.
- A scan is called positive when ``score >= threshold``. Ties between a positive and a negative count
  one half in the AUROC (the Mann-Whitney statistic), exactly as ``sklearn.metrics.roc_auc_score``.
- AUPRC is the average precision: sum over thresholds of (recall step) x precision, as
  ``sklearn.metrics.average_precision_score`` (no interpolation).
- Sensitivity at specificity s is the highest sensitivity over thresholds whose specificity is >= s.
- A replicate without a positive or without a negative has no metric: NaN, and is left out of CIs.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _checked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of one length")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return labels, scores


def cumulative_counts(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true and false positives at each distinct threshold, from the highest score down.

    Returns ``(tp, fp, thresholds)``: ``tp``/``fp`` of shape (..., U) for U distinct scores, where
    entry k counts the weight of positives/negatives with ``score >= thresholds[k]``.
    """
    labels, scores = _checked(labels, scores)
    weights = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    group_ends = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # last scan of each tie group
    w = weights[..., order]
    y = labels[order]
    tp = np.cumsum(w * y, axis=-1)[..., group_ends]
    fp = np.cumsum(w * (1.0 - y), axis=-1)[..., group_ends]
    return tp, fp, sorted_scores[group_ends]


def _with_origin(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(counts.shape[:-1] + (1,)), counts], axis=-1)


def _totals(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positives, negatives = tp[..., -1], fp[..., -1]
    valid = (positives > 0) & (negatives > 0)
    return np.where(valid, positives, 1.0), np.where(valid, negatives, 1.0), valid


def auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve (Mann-Whitney U / (P N), ties count 1/2); NaN without both classes."""
    return _auroc(*cumulative_counts(labels, scores, weights)[:2])


def _auroc(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    positives, negatives, valid = _totals(tp, fp)
    tp, fp = _with_origin(tp), _with_origin(fp)
    # Trapezoids between consecutive thresholds: a tie group contributes its diagonal, i.e. 1/2 per tie.
    area = np.sum(np.diff(fp, axis=-1) * (tp[..., 1:] + tp[..., :-1]) / 2.0, axis=-1)
    return np.where(valid, area / (positives * negatives), np.nan)


def average_precision(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUPRC as average precision: sum over thresholds of (recall step) x precision; NaN without both classes."""
    return _average_precision(*cumulative_counts(labels, scores, weights)[:2])


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    positives, _, valid = _totals(tp, fp)
    called = tp + fp
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    recall_steps = np.diff(_with_origin(tp), axis=-1) / positives[..., None]
    return np.where(valid, np.sum(recall_steps * precision, axis=-1), np.nan)


def sensitivity_at_specificity(
    labels: np.ndarray, scores: np.ndarray, specificity: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """Highest sensitivity over thresholds with specificity >= ``specificity``; NaN without both classes."""
    return _sensitivity_at_specificity(*cumulative_counts(labels, scores, weights)[:2], specificity)


def _sensitivity_at_specificity(tp: np.ndarray, fp: np.ndarray, specificity: float) -> np.ndarray:
    positives, negatives, valid = _totals(tp, fp)
    tp, fp = _with_origin(tp), _with_origin(fp)  # the origin: a threshold above every score
    # Relative slack: (1 - 0.9) * 10 is 0.9999999999999998 in floating point, yet 1 false positive of 10 is allowed.
    allowed = fp <= (1.0 - specificity + 1e-9) * negatives[..., None]
    best = np.max(np.where(allowed, tp, 0.0), axis=-1)
    return np.where(valid, best / positives, np.nan)


def threshold_at_specificity(labels: np.ndarray, scores: np.ndarray, specificity: float) -> dict:
    """The operating point of ``scores`` at ``specificity``: the lowest threshold (a scan is positive when
    ``score >= threshold``) whose specificity on these scans is at least ``specificity``, so the one with
    the highest sensitivity there. Returns ``{"threshold", "sensitivity", "specificity"}`` as reached on
    these scans; when even the highest score is too many false positives, the threshold lies just above
    every score (nothing is called positive). Needs a positive and a negative (ValueError otherwise)."""
    tp, fp, thresholds = cumulative_counts(labels, scores)
    positives, negatives, valid = _totals(tp, fp)
    if not valid:
        raise ValueError("an operating point needs at least one positive and one negative")
    allowed = np.flatnonzero(fp <= (1.0 - specificity + 1e-9) * negatives)  # same slack as sensitivity_at_specificity
    if allowed.size == 0:
        return {"threshold": float(np.nextafter(thresholds[0], np.inf)), "sensitivity": 0.0, "specificity": 1.0}
    k = allowed[-1]  # fp grows as the threshold falls: the last allowed one is the lowest
    return {"threshold": float(thresholds[k]), "sensitivity": float(tp[k] / positives),
            "specificity": float(1.0 - fp[k] / negatives)}


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from (0, 0) to (1, 1), one per distinct threshold."""
    tp, fp, _ = cumulative_counts(labels, scores)
    positives, negatives, valid = _totals(tp, fp)
    if not valid:
        raise ValueError("an ROC curve needs at least one positive and one negative")
    return _with_origin(fp) / negatives, _with_origin(tp) / positives


def detection_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """AUROC, AUPRC and sensitivity at 90% / 95% specificity, each of shape ``weights.shape[:-1]``."""
    tp, fp, _ = cumulative_counts(labels, scores, weights)
    return {
        "auroc": _auroc(tp, fp),
        "auprc": _average_precision(tp, fp),
        "sens_at_spec90": _sensitivity_at_specificity(tp, fp, 0.90),
        "sens_at_spec95": _sensitivity_at_specificity(tp, fp, 0.95),
    }


# -------------------------------------------------------------------------------------- bootstrap
def patient_bootstrap_weights(patient_ids: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Scan weights of a patient-level bootstrap, shape (n_resamples, n_scans).

    Each replicate draws as many patients as there are, with replacement; every scan of a patient drawn
    k times gets weight k, so a patient's scans always stay together (they are not independent).
    """
    _, patient_index = np.unique(np.asarray(patient_ids), return_inverse=True)
    n_patients = int(patient_index.max()) + 1 if patient_index.size else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    counts = np.zeros((n_resamples, n_patients))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    return counts[:, patient_index]


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of bootstrap replicates (NaN replicates left out; NaN, NaN if none is left)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


# ------------------------------------------------------------------------------------------ DeLong
def delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of M score sets on the same scans and their covariance (DeLong, DeLong & Clarke-Pearson 1988).

    ``scores`` has shape (M, n). Returns ``(aucs (M,), covariance (M, M))``. Computed with midranks
    (Sun & Xu 2014), so ties count 1/2 as in :func:`auroc`. Scans are treated as independent.
    """
    labels = np.asarray(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = scores[:, labels == 1]
    negative = scores[:, labels == 0]
    m, n = positive.shape[1], negative.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong's variance needs at least two positives and two negatives")
    rank_positive = stats.rankdata(positive, axis=1)
    rank_negative = stats.rankdata(negative, axis=1)
    rank_all = stats.rankdata(np.concatenate([positive, negative], axis=1), axis=1)
    # Structural components: per positive, the share of negatives it outranks; per negative, the share
    # of positives that outrank it.
    v10 = (rank_all[:, :m] - rank_positive) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_negative) / m
    aucs = v10.mean(axis=1)
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """Paired DeLong test of AUROC(a) = AUROC(b) on the same scans: AUCs, difference, z and two-sided p."""
    aucs, cov = delong(labels, np.stack([scores_a, scores_b]))
    difference = aucs[0] - aucs[1]
    variance = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    if variance <= 0:
        z = 0.0 if difference == 0 else float(np.sign(difference) * np.inf)
    else:
        z = float(difference / np.sqrt(variance))
    return {
        "auroc_a": float(aucs[0]),
        "auroc_b": float(aucs[1]),
        "difference": float(difference),
        "z": z,
        "p_value": float(2.0 * stats.norm.sf(abs(z))),
    }
