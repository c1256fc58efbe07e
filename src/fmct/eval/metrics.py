"""Binary detection metrics, patient-level bootstrap CIs and p-values, Holm's correction, operating
points and calibration (numpy only).

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
- A set with fewer than :data:`MIN_PER_CLASS` positives or negatives is *not estimable*: its metrics are
  not reported at all (:func:`not_estimable_reason`), since one scan more or less would swing them.
- A metric's CI is the percentile interval of its bootstrap replicates. A paired difference gets its CI
  and p-value from one statistic, its bootstrap standard error (:func:`bootstrap_difference_test`), so
  a 95% CI excludes 0 exactly when p < 0.05.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

MIN_PER_CLASS = 5  # fewer positives or negatives than this: a metric is not estimable


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
    positives, _, valid = _totals(tp, fp)
    best_tp, _, _ = _at_specificity(tp, fp, specificity)
    return np.where(valid, best_tp / positives, np.nan)


def _at_specificity(tp: np.ndarray, fp: np.ndarray, specificity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (tp, fp) at the lowest threshold whose specificity is >= ``specificity`` (the one with the
    highest sensitivity), and the index of that threshold among the distinct scores (-1: above every score)."""
    _, negatives, _ = _totals(tp, fp)
    # Relative slack: (1 - 0.9) * 10 is 0.9999999999999998 in floating point, yet 1 false positive of 10 is allowed.
    allowed = fp <= (1.0 - specificity + 1e-9) * negatives[..., None]
    # fp grows as the threshold falls, so the allowed thresholds are a prefix; the last one calls the most positives.
    index = np.sum(allowed, axis=-1) - 1
    picked_tp = np.take_along_axis(_with_origin(tp), (index + 1)[..., None], axis=-1)[..., 0]
    picked_fp = np.take_along_axis(_with_origin(fp), (index + 1)[..., None], axis=-1)[..., 0]
    return picked_tp, picked_fp, index


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
        "sensitivity_spec90": _sensitivity_at_specificity(tp, fp, 0.90),
        "sensitivity_spec95": _sensitivity_at_specificity(tp, fp, 0.95),
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


def bootstrap_difference_test(difference: float, replicates: np.ndarray, level: float = 0.95) -> dict:
    """CI and two-sided p-value of a paired difference from one bootstrap: its standard error.

    ``se`` is the standard deviation of the finite ``replicates`` of the difference; the CI is
    ``difference +- z se`` with z the normal quantile of ``level``, and ``p = 2 (1 - Phi(|difference| / se))``
    (the bootstrap test of pROC's ``roc.test``). Both come from the same (difference, se), so the CI
    excludes 0 exactly when p < 1 - level; and p, unlike a count of replicates beyond 0, is not limited to
    multiples of 1 / R, so Holm's adjustment over many comparisons stays meaningful. Returns ``se, low,
    high, p_value`` (NaN with fewer than two finite replicates; p is 1 for a zero difference of zero se).
    """
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2 or not math.isfinite(difference):
        return {"se": float("nan"), "low": float("nan"), "high": float("nan"), "p_value": float("nan")}
    se = float(np.std(finite, ddof=1))
    z = stats.norm.ppf(0.5 + level / 2.0)
    if se > 0:
        p_value = 2.0 * stats.norm.sf(abs(difference) / se)
    else:
        p_value = 1.0 if difference == 0 else 0.0
    return {"se": se, "low": float(difference - z * se), "high": float(difference + z * se), "p_value": float(p_value)}


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (family-wise error rate); NaN entries are not
    in the family and stay NaN.

    Sorted ascending, the k-th smallest (k from 1) becomes ``max over i <= k of min(1, (m - i + 1) p_(i))``
    for m finite p-values.
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="mergesort")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def not_estimable_reason(n_positives: int, n_negatives: int) -> str | None:
    """Why a metric of a set with these counts is not reported (fewer than :data:`MIN_PER_CLASS` of a class),
    or None."""
    short = [f"{n} {kind}" for n, kind in ((n_positives, "positives"), (n_negatives, "negatives")) if n < MIN_PER_CLASS]
    return f"not estimable: {' and '.join(short)} (fewer than {MIN_PER_CLASS})" if short else None


# ------------------------------------------------------------------------------- operating points
OPERATING_POINT_NAMES = ("sensitivity", "specificity", "ppv", "npv")


def operating_point(
    labels: np.ndarray, scores: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> dict:
    """Sensitivity, specificity, PPV and NPV when every scan with ``score >= threshold`` is called positive.

    Each has shape ``weights.shape[:-1]``; NaN without both classes, a PPV without a positive call and an
    NPV without a negative call are NaN too. PPV and NPV hold at this set's prevalence only.
    """
    labels, scores = _checked(labels, scores)
    weights = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    called = (scores >= threshold).astype(np.float64)
    tp = weights @ (labels * called)
    fp = weights @ ((1.0 - labels) * called)
    return _rates(tp, fp, weights @ labels, weights @ (1.0 - labels))


def operating_point_at_specificity(
    labels: np.ndarray, scores: np.ndarray, specificity: float, weights: np.ndarray | None = None
) -> dict:
    """:func:`operating_point` at the threshold chosen on these very scans: the lowest whose specificity is
    >= ``specificity`` (the one :func:`sensitivity_at_specificity` uses), chosen again in every replicate.

    Also returns ``threshold`` (the score of that threshold; +inf when even the highest score is too many).
    A threshold chosen on the test set flatters it: use a threshold chosen on validation when there is one.
    """
    tp, fp, thresholds = cumulative_counts(labels, scores, weights)
    positives, negatives = tp[..., -1], fp[..., -1]
    picked_tp, picked_fp, index = _at_specificity(tp, fp, specificity)
    rates = _rates(picked_tp, picked_fp, positives, negatives)
    rates["threshold"] = np.where(index >= 0, thresholds[np.maximum(index, 0)], np.inf)
    return rates


def _rates(tp: np.ndarray, fp: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> dict:
    valid = (positives > 0) & (negatives > 0)
    fn, tn = positives - tp, negatives - fp

    def ratio(a, b):
        return np.where(valid & (b > 0), a / np.where(b > 0, b, 1.0), np.nan)

    return {
        "sensitivity": ratio(tp, positives),
        "specificity": ratio(tn, negatives),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


# ------------------------------------------------------------------------------------ calibration
CALIBRATION_BINS = 10  # equal-width bins of predicted probability over [0, 1]


def calibration_bins(
    labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None, n_bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width probability bin: weighted count, sum of probabilities and sum of labels, each of
    shape ``weights.shape[:-1] + (n_bins,)``. Bin b holds [b / n_bins, (b + 1) / n_bins), the last one includes 1."""
    labels, probabilities = _checked(labels, probabilities)
    if np.any((probabilities < 0) | (probabilities > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    weights = np.ones_like(probabilities) if weights is None else np.asarray(weights, dtype=np.float64)
    members = np.eye(n_bins)[np.minimum((probabilities * n_bins).astype(int), n_bins - 1)]  # (n, n_bins)
    return weights @ members, weights @ (members * probabilities[:, None]), weights @ (members * labels[:, None])


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None, n_bins: int = CALIBRATION_BINS
) -> np.ndarray:
    """ECE: the count-weighted mean over bins of |mean probability - observed rate of positives|, in [0, 1]."""
    counts, probability_sums, label_sums = calibration_bins(labels, probabilities, weights, n_bins)
    total = counts.sum(axis=-1)
    return np.sum(np.abs(probability_sums - label_sums), axis=-1) / np.where(total > 0, total, np.nan)
