"""What a fit keeps for its detector (fmct.eval.calibration): a monotone calibration that never gives every
scan one probability, thresholds on the probability a reader sees, and a flag for a detector no better
than chance on validation."""

import numpy as np
import pytest

from fmct.detector import calibrated_probability, unvalidated_findings
from fmct.eval.calibration import MIN_LOGIT_SPAN, calibrate_finding, fit_calibration, fit_platt, validation_status


def test_platt_on_a_hand_example_is_increasing_and_keeps_the_ranking():
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    calibration = fit_calibration(labels, scores)
    assert calibration["method"] == "platt" and calibration["a"] > 0
    probabilities = calibrated_probability(calibration, scores)
    assert np.all(np.diff(probabilities) > 0)
    # Platt's smoothed targets keep the fit off 0 and 1: (3 + 1) / (3 + 2) = 0.8 and 1 / (3 + 2) = 0.2 bound
    # what maximum likelihood can reach on average over each class.
    assert 0 < probabilities.min() and probabilities.max() < 1


def test_a_degenerate_platt_fit_falls_back_to_no_calibration():
    # The case seen in the demo: validation AUROC 0.21 (scores ranked against the labels). Platt's slope,
    # held at a >= 0, is 0: every scan would get the prior, 0.0928571 for every scan of the demo.
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.linspace(-2.0, 2.0, len(labels))
    assert fit_platt(labels, scores)["a"] * np.ptp(scores) < MIN_LOGIT_SPAN
    calibration = fit_calibration(labels, scores)
    assert (calibration["method"], calibration["a"], calibration["b"]) == ("none", 1.0, 0.0)
    assert "degenerate" in calibration["reason"]
    probabilities = calibrated_probability(calibration, scores)
    # The head's own sigmoid: two float64 forms of it (tanh and exp) agree to a few ulps, far inside 1e-12.
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-scores)), rtol=1e-12)
    assert len(np.unique(probabilities)) == len(scores)


@pytest.mark.parametrize("seed", range(5))
def test_decisions_on_the_probability_match_the_validation_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.3).astype(int)
    scores = 1.5 * labels + rng.normal(size=60)
    entry = calibrate_finding(labels, scores, patients=np.arange(60).astype(str))
    probabilities = calibrated_probability(entry["calibration"], scores)
    for point in entry["operating_points"].values():
        by_probability = probabilities >= point["threshold"]
        assert np.array_equal(by_probability, scores >= point["score_threshold"])
        assert np.mean(~by_probability[labels == 0]) == pytest.approx(point["val_specificity"])
        assert np.mean(by_probability[labels == 1]) == pytest.approx(point["val_sensitivity"])
        assert point["val_specificity"] >= point["specificity_target"]


def test_validation_status_flags_chance_and_too_few_positives():
    rng = np.random.default_rng(3)
    patients = np.arange(40).astype(str)
    labels = np.array([1] * 15 + [0] * 25)
    separated = validation_status(labels, labels + 0.1 * rng.normal(size=40), patients)
    assert separated["validated"] and separated["auroc"] == 1.0 and separated["auroc_lo"] > 0.5

    chance = validation_status(labels, rng.normal(size=40), patients)
    assert not chance["validated"] and chance["auroc_lo"] <= 0.5 <= chance["auroc_hi"]
    assert "no better than chance on validation" in chance["reason"] and "includes 0.5" in chance["reason"]

    few = validation_status(np.array([1, 1, 1] + [0] * 37), np.r_[[5.0, 5.0, 5.0], rng.normal(size=37)], patients)
    assert not few["validated"] and "too few validation scans" in few["reason"] and "3 positives" in few["reason"]

    config = {
        "findings": ["ich", "sdh"],
        "per_finding": {"ich": {"validation": separated}, "sdh": {"validation": chance}},
    }
    assert list(unvalidated_findings(config)) == ["sdh"]
