"""What a fit keeps for its detector, set on the validation split: calibration, operating points and
whether the validation split shows the finding is detected at all.

**Calibration**: Platt scaling, p = sigmoid(a * score + b), fitted on the validation split by maximum
likelihood with Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) and a >= 0. Platt rather
than isotonic regression because validation splits are small (tens of scans, a handful of positives):
two parameters do not overfit them, the map is strictly increasing so it keeps the ranking (and so every
AUROC and every threshold), and the smoothed targets keep a perfectly separated validation split from
sending the slope to infinity. A **degenerate** fit, one whose slope moves the logit by less than
:data:`MIN_LOGIT_SPAN` across the validation scores (a validation AUROC at or below 0.5 gives a = 0), would
give every scan the same probability; it is refused for **no calibration** (``method: "none"``): p =
sigmoid(score), the head's own logit, which is strictly increasing too. Either way the map is
``{"method", "a", "b"}`` and :func:`fmct.detector.calibrated_probability` applies it.

**Operating points** (:data:`OPERATING_POINTS`): for each finding, the lowest score threshold whose
specificity on the validation split is at least 90 % (``spec90``) and 95 % (``spec95``), stored as the
probability it maps to. A scan is called positive when its probability is at least that threshold, so a
decision follows from the probability a reader sees.

**Validated**: a finding's detector is validated when its validation split has at least
:data:`fmct.eval.metrics.MIN_PER_CLASS` positives and negatives and the lower end of its validation AUROC's
patient-level bootstrap 95 % CI is above 0.5. Otherwise the validation split cannot tell it from chance,
and its probabilities are not to be trusted: the detector's card says so, and ``fmct predict`` warns
(or, with ``--require-validated``, refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

from fmct.detector import calibrated_probability
from fmct.eval import metrics as M
from fmct.eval.cohort import Cohort

OPERATING_POINTS = {"spec90": 0.90, "spec95": 0.95}  # name -> specificity reached on the validation split
MIN_LOGIT_SPAN = 1e-3  # a map moving the logit less than this across validation gives one probability to all
N_BOOTSTRAP = 1000


def fit_platt(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Platt scaling of ``scores`` (N,) against 0/1 ``labels``: ``{"method": "platt", "a", "b"}`` with
    p = sigmoid(a * score + b), maximum likelihood on Platt's smoothed targets, a >= 0 (see the module)."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = float(np.sum(labels == 1)), float(np.sum(labels == 0))
    target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    centre, spread = (
        float(np.mean(scores)),
        float(np.std(scores)) or 1.0,
    )  # fit on standardised scores: well conditioned

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * (scores - centre) / spread + params[1]
        p = 1.0 / (1.0 + np.exp(-z))
        # Cross-entropy written with logaddexp, finite for any z.
        value = np.sum(target * np.logaddexp(0.0, -z) + (1 - target) * np.logaddexp(0.0, z))
        residual = p - target
        return float(value), np.array([np.sum(residual * (scores - centre) / spread), np.sum(residual)])

    prior = np.log((n_pos + 1) / (n_neg + 1))
    result = optimize.minimize(
        loss, x0=np.array([1.0, prior]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)]
    )
    slope, offset = result.x
    a = float(slope / spread)
    return {"method": "platt", "a": a, "b": float(offset - a * centre)}


def fit_calibration(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The calibration map of a finding: :func:`fit_platt`, or no calibration (``method: "none"``, a = 1,
    b = 0, with the ``reason``) when the Platt fit is degenerate (see the module)."""
    platt = fit_platt(labels, scores)
    span = platt["a"] * float(np.ptp(np.asarray(scores, dtype=np.float64)))
    if span >= MIN_LOGIT_SPAN:
        return platt
    return {
        "method": "none",
        "a": 1.0,
        "b": 0.0,
        "reason": f"Platt scaling was degenerate (slope {platt['a']:.3g}: every scan would get one probability); "
        "the probability is the head's own sigmoid",
    }


def validation_status(labels: np.ndarray, scores: np.ndarray, patients: np.ndarray) -> dict:
    """Validation counts, AUROC with its patient-level bootstrap 95 % CI, and ``validated`` (with the
    ``reason`` when not; see the module) of one finding's validation scans."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    weights = np.vstack([np.ones((1, len(labels))), M.patient_bootstrap_weights(patients, N_BOOTSTRAP, seed=0)])
    replicates = M.auroc(labels, scores, weights)
    low, high = M.percentile_interval(replicates[1:])
    status = {"n_pos": n_pos, "n_neg": n_neg, "auroc": float(replicates[0]), "auroc_lo": low, "auroc_hi": high}
    too_few = M.not_estimable_reason(n_pos, n_neg)
    if too_few is not None:
        return {**status, "validated": False, "reason": f"too few validation scans to tell it from chance ({too_few})"}
    if not low > 0.5:
        return {
            **status,
            "validated": False,
            "reason": f"no better than chance on validation: AUROC {status['auroc']:.2f} [{low:.2f}, {high:.2f}] "
            "includes 0.5",
        }
    return {**status, "validated": True}


def calibrate_finding(labels: np.ndarray, scores: np.ndarray, patients: np.ndarray) -> dict:
    """What a detector keeps of one finding from its validation scans (0/1 ``labels``, ``scores``,
    ``patients`` for the bootstrap): the calibration map, the operating points of :data:`OPERATING_POINTS`
    (``threshold``: on the probability; ``score_threshold``; the sensitivity and specificity reached on
    validation) and :func:`validation_status`. Raises ValueError when the validation scans lack a
    positive or a negative."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not (np.any(labels == 1) and np.any(labels == 0)):
        raise ValueError("the validation split needs a positive and a negative to set thresholds and calibration")
    calibration = fit_calibration(labels, scores)
    points = {}
    for name, specificity in OPERATING_POINTS.items():
        point = {
            key: float(value) for key, value in M.operating_point_at_specificity(labels, scores, specificity).items()
        }
        # Above every score when even the highest one is too many false positives: nothing is called positive.
        score_threshold = (
            point["threshold"] if np.isfinite(point["threshold"]) else float(np.nextafter(scores.max(), np.inf))
        )
        points[name] = {
            "specificity_target": specificity,
            "score_threshold": score_threshold,
            "threshold": float(calibrated_probability(calibration, score_threshold)),
            "val_sensitivity": point["sensitivity"],
            "val_specificity": point["specificity"],
        }
    return {
        "calibration": calibration,
        "operating_points": points,
        "validation": validation_status(labels, scores, patients),
    }


@dataclass
class FindingFit:
    """One finding of one fit, as cohort rows with the fit's scores: its training scans, its validation
    scans (thresholds and calibration are set on them) and its evaluated (test and ood) scans."""

    train_rows: np.ndarray
    val_rows: np.ndarray
    val_scores: np.ndarray
    eval_rows: np.ndarray
    eval_scores: np.ndarray


def summarise_fit(cohort: Cohort, fits: dict[int, FindingFit], n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """The per-finding part of a detector's ``config.json`` for the fits of cohort findings ``fits``:
    ``per_finding`` (:func:`calibrate_finding`), ``left_out`` ({finding: why} for a finding whose
    validation split lacks a class), and the provenance's ``n_train`` and ``metrics``
    (:meth:`Cohort.fit_metrics` at the operating points' score thresholds)."""
    per_finding, left_out, n_train, metrics = {}, {}, {}, {}
    for f, fit in fits.items():
        name, labels = cohort.findings[f], cohort.labels[:, f]
        n_train[name] = {
            "pos": int(np.sum(labels[fit.train_rows] == 1)),
            "neg": int(np.sum(labels[fit.train_rows] == 0)),
        }
        try:
            entry = calibrate_finding(labels[fit.val_rows], fit.val_scores, cohort.patients[fit.val_rows])
        except ValueError as error:
            left_out[name] = str(error)
            continue
        per_finding[name] = entry
        thresholds = {point: values["score_threshold"] for point, values in entry["operating_points"].items()}
        metrics[name] = cohort.fit_metrics(
            f, fit.eval_rows, np.asarray(fit.eval_scores, dtype=np.float64), thresholds, n_bootstrap
        )
    return {"per_finding": per_finding, "left_out": left_out, "n_train": n_train, "metrics": metrics}


def prediction_columns(summary: dict, finding: str, score: float) -> dict:
    """The optional columns of a ``predictions.csv`` row (:data:`fmct.eval.evaluate.OPTIONAL_COLUMNS`) of a
    fit's ``score`` of ``finding``, from :func:`summarise_fit`: the calibrated ``probability`` and the
    validation thresholds ``threshold_spec90`` / ``threshold_spec95`` on it; none when the finding could
    not be calibrated."""
    entry = summary["per_finding"].get(finding)
    if entry is None:
        return {}
    return {
        "probability": float(calibrated_probability(entry["calibration"], score)),
        **{f"threshold_{name}": point["threshold"] for name, point in entry["operating_points"].items()},
    }
