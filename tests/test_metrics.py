"""Metrics, bootstrap CIs and p-values, Holm, operating points, calibration, splits and label budgets
against known answers."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fmct.errors import InputError
from fmct.eval import metrics as M
from fmct.eval.splits import assign_splits, training_subset

# Hanley & McNeil (1982), Table 1: CT ratings 1 (definitely normal) .. 5 (definitely abnormal).
HM_NORMAL_COUNTS = [33, 6, 6, 11, 2]  # 58 truly normal
HM_ABNORMAL_COUNTS = [3, 2, 2, 11, 33]  # 51 truly abnormal


def _hanley_mcneil():
    scores = np.concatenate(
        [np.repeat(np.arange(1, 6), HM_NORMAL_COUNTS), np.repeat(np.arange(1, 6), HM_ABNORMAL_COUNTS)]
    )
    labels = np.concatenate([np.zeros(58), np.ones(51)])
    return labels, scores.astype(float)


def test_hanley_mcneil_auc_by_hand_and_bootstrap_standard_error():
    labels, scores = _hanley_mcneil()
    # By hand: P(abnormal rated higher) + 1/2 P(tie), over the 58 x 51 pairs.
    higher = sum(a * sum(HM_NORMAL_COUNTS[:i]) for i, a in enumerate(HM_ABNORMAL_COUNTS))
    ties = sum(a * n for a, n in zip(HM_ABNORMAL_COUNTS, HM_NORMAL_COUNTS))
    expected = (higher + 0.5 * ties) / (58 * 51)
    assert round(expected, 3) == 0.893  # the paper's value
    assert float(M.auroc(labels, scores)) == pytest.approx(expected, abs=1e-12)
    # The bootstrap's standard error against the paper's (0.0333, from its exponential approximation;
    # DeLong's is 0.0315).
    replicates = M.auroc(labels, scores, M.patient_bootstrap_weights(np.arange(len(labels)), 2000, seed=0))
    assert np.std(replicates) == pytest.approx(0.032, abs=0.003)


def test_metrics_match_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(6, 80))
        labels = rng.integers(0, 2, n).astype(float)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n) / 5.0 if trial % 2 else rng.normal(size=n)
        assert float(M.auroc(labels, scores)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert float(M.average_precision(labels, scores)) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        for specificity in (0.90, 0.95):
            expected = tpr[fpr <= 1 - specificity + 1e-12].max()
            assert float(M.sensitivity_at_specificity(labels, scores, specificity)) == pytest.approx(
                expected, abs=1e-12
            )
        weights = rng.integers(1, 4, n).astype(float)
        assert float(M.auroc(labels, scores, weights)) == pytest.approx(
            roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12
        )


def test_sensitivity_at_specificity_by_hand():
    # 10 negatives, so 90% specificity allows exactly one negative above the threshold.
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 3, 3, 2, 2, 1, 1, 1, 0], dtype=float)
    assert float(M.sensitivity_at_specificity(labels, scores, 0.90)) == pytest.approx(4 / 5)
    assert float(M.sensitivity_at_specificity(labels, scores, 0.95)) == pytest.approx(2 / 5)


def test_perfectly_separable_gives_auc_one_with_ci_one_one():
    labels = np.r_[np.zeros(40), np.ones(20)]
    scores = np.r_[np.linspace(0, 0.4, 40), np.linspace(0.6, 1.0, 20)]
    patients = np.arange(60) // 2  # two scans per patient
    weights = M.patient_bootstrap_weights(patients, 500, seed=0)
    replicates = M.detection_metrics(labels, scores, weights)
    assert float(M.auroc(labels, scores)) == 1.0
    assert M.percentile_interval(replicates["auroc"]) == (1.0, 1.0)
    assert M.percentile_interval(replicates["sensitivity_spec95"]) == (1.0, 1.0)
    assert M.percentile_interval(replicates["auprc"]) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_random_scores_give_auc_near_half_and_ci_covering_it():
    rng = np.random.default_rng(7)
    labels, scores = rng.integers(0, 2, 2000), rng.random(2000)
    auc = float(M.auroc(labels, scores))
    assert abs(auc - 0.5) < 0.03
    low, high = M.percentile_interval(M.auroc(labels, scores, M.patient_bootstrap_weights(np.arange(2000), 400, 1)))
    assert low < 0.5 < high and 0.03 < high - low < 0.07  # width ~ 2 x 1.96 x 0.013


def test_patient_bootstrap_keeps_a_patients_scans_together():
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    weights = M.patient_bootstrap_weights(patients, 300, seed=3)
    assert weights.shape == (300, 6)
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 1] == weights[:, 2])
    assert np.all(weights[:, 4] == weights[:, 5])
    # Three patients drawn per replicate: a's weight counts once per draw of a, so per-patient counts sum to 3.
    assert np.all(weights[:, 0] + weights[:, 3] + weights[:, 4] == 3)
    assert np.array_equal(weights, M.patient_bootstrap_weights(patients, 300, seed=3))


def test_holm_adjusted_p_values_by_hand():
    # Sorted: 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06.
    adjusted = M.holm([0.01, 0.04, float("nan"), 0.03, 0.005])
    assert adjusted[[0, 1, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert np.isnan(adjusted[2])  # not in the family: m is 4
    assert M.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # 2 x 0.3, then max(0.6, 0.6)
    assert M.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert M.holm([]).shape == (0,)


def test_bootstrap_difference_test_by_hand_and_ci_excludes_zero_exactly_when_p_is_below_alpha():
    replicates = 0.1 + 0.05 * np.r_[-np.ones(50), np.ones(50)] * np.sqrt(99 / 100)  # sample sd exactly 0.05
    test = M.bootstrap_difference_test(0.1, replicates, 0.95)
    assert test["se"] == pytest.approx(0.05)
    assert test["p_value"] == pytest.approx(0.0455003, abs=1e-6)  # z = 2: 2 (1 - Phi(2))
    assert (test["low"], test["high"]) == pytest.approx((0.1 - 1.959964 * 0.05, 0.1 + 1.959964 * 0.05), abs=1e-6)
    assert M.bootstrap_difference_test(0.0, np.zeros(10))["p_value"] == 1.0  # identical systems
    assert M.bootstrap_difference_test(0.2, np.full(10, 0.2))["p_value"] == 0.0  # a difference in every replicate
    assert np.isnan(M.bootstrap_difference_test(0.1, np.array([0.1, np.nan]))["p_value"])  # one finite replicate

    rng = np.random.default_rng(5)
    for trial in range(300):
        replicates = rng.normal(rng.normal(0, 0.05), 0.03, int(rng.integers(2, 2000)))
        replicates[rng.random(replicates.size) < 0.02] = np.nan
        level = (0.95, 0.90, 0.99)[trial % 3]
        test = M.bootstrap_difference_test(float(np.nanmean(replicates)), replicates, level)
        assert (test["p_value"] < 1 - level) == (test["low"] > 0 or test["high"] < 0)


def test_operating_points_by_hand_and_with_bootstrap_weights():
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 3, 3, 2, 2, 1, 1, 1, 0], dtype=float)
    # Threshold 7: called 9, 8, 7 = two true positives, one false positive, of 5 positives and 10 negatives.
    point = M.operating_point(labels, scores, 7.0)
    assert {k: float(v) for k, v in point.items()} == pytest.approx(
        {"sensitivity": 2 / 5, "specificity": 9 / 10, "ppv": 2 / 3, "npv": 9 / 12}
    )
    # 90% specificity allows one false positive: the lowest such threshold is 5 (tp 4, fp 1).
    chosen = M.operating_point_at_specificity(labels, scores, 0.90)
    assert {k: float(v) for k, v in chosen.items()} == pytest.approx(
        {"sensitivity": 4 / 5, "specificity": 9 / 10, "ppv": 4 / 5, "npv": 9 / 10, "threshold": 5.0}
    )
    assert float(chosen["sensitivity"]) == float(M.sensitivity_at_specificity(labels, scores, 0.90))
    strict = M.operating_point_at_specificity(labels, scores, 0.95)  # no false positive allowed: threshold 8
    assert (
        float(strict["threshold"]) == 8.0
        and float(strict["ppv"]) == 1.0
        and float(strict["npv"]) == pytest.approx(10 / 13)
    )
    nothing = M.operating_point(labels, scores, 10.0)  # no positive call: PPV undefined, NPV the share of negatives
    assert np.isnan(nothing["ppv"]) and float(nothing["npv"]) == pytest.approx(10 / 15)

    # Weights of many replicates at once give what each replicate alone gives.
    weights = M.patient_bootstrap_weights(np.arange(15) // 3, 50, seed=1)
    batched = M.operating_point_at_specificity(labels, scores, 0.90, weights)
    fixed = M.operating_point(labels, scores, 6.0, weights)
    for r in range(50):
        one = M.operating_point_at_specificity(labels, scores, 0.90, weights[r])
        assert float(one["threshold"]) == batched["threshold"][r]
        np.testing.assert_allclose(float(one["sensitivity"]), batched["sensitivity"][r], equal_nan=True)
        np.testing.assert_allclose(
            float(M.operating_point(labels, scores, 6.0, weights[r])["npv"]), fixed["npv"][r], equal_nan=True
        )
        assert batched["specificity"][r] >= 0.9 - 1e-12 or np.isnan(batched["specificity"][r])


def test_expected_calibration_error_by_hand_and_for_calibrated_probabilities():
    # Bins [0, 0.1): 0.05 vs 0; [0.1, 0.2): 0.15 + 0.15 vs 0 + 1; [0.9, 1]: 0.95 vs 1 -> (0.05 + 0.7 + 0.05) / 4.
    labels, probabilities = np.array([0, 0, 1, 1]), np.array([0.05, 0.15, 0.15, 0.95])
    assert float(M.expected_calibration_error(labels, probabilities)) == pytest.approx(0.2)
    counts, probability_sums, label_sums = M.calibration_bins(labels, probabilities)
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1] and label_sums[1] == 1 and probability_sums[9] == 0.95
    assert float(M.calibration_bins(np.array([1]), np.array([1.0]))[0][9]) == 1  # 1 lies in the last bin

    rng = np.random.default_rng(3)
    p = rng.random(20000)
    calibrated = (rng.random(20000) < p).astype(float)
    assert float(M.expected_calibration_error(calibrated, p)) < 0.02
    assert float(M.expected_calibration_error(calibrated, p**3)) > 0.15  # overconfident negatives
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error(calibrated, p + 1)


def test_not_estimable_below_five_of_a_class():
    assert M.not_estimable_reason(5, 5) is None
    assert M.not_estimable_reason(4, 100) == "not estimable: 4 positives (fewer than 5)"
    assert M.not_estimable_reason(0, 3) == "not estimable: 0 positives and 3 negatives (fewer than 5)"


# ------------------------------------------------------------------------------------------ splits
def _cohort(n_patients=300, seed=0):
    rng = np.random.default_rng(seed)
    scans_per_patient = rng.integers(1, 4, n_patients)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], scans_per_patient)
    patient_positive = rng.random((n_patients, 2)) < [0.2, 0.05]
    labels = np.repeat(patient_positive, scans_per_patient, axis=0).astype(float)
    labels[rng.random(labels.shape) < 0.05] = np.nan
    return patients, labels


def test_patient_split_has_no_leak_and_is_stratified():
    patients, labels = _cohort()
    split = assign_splits(patients, labels, val_fraction=0.15, test_fraction=0.2, seed=4)
    for patient in np.unique(patients):
        assert len(set(split[patients == patient])) == 1
    for name, share in (("train", 0.65), ("val", 0.15), ("test", 0.2)):
        assert abs(np.mean(split == name) - share) < 0.03
        for f in range(2):
            positives = np.nansum(labels[:, f] == 1)
            assert abs(np.sum(labels[split == name, f] == 1) - share * positives) <= max(3, 0.1 * positives)
    assert np.array_equal(split, assign_splits(patients, labels, val_fraction=0.15, test_fraction=0.2, seed=4))


def test_explicit_split_wins_and_ood_sites_are_test_only():
    patients = np.array(["a", "a", "b", "c", "d", "d", "e"])
    labels = np.array([[1], [1], [0], [1], [0], [0], [1]], dtype=float)
    sites = np.array(["A", "B", "A", "A", "A", "A", "B"])
    explicit = np.array(["train", "", "val", "", "", "", ""])
    split = assign_splits(patients, labels, sites, explicit, ood_sites=("B",), seed=0)
    assert split[1] == "ood" and split[6] == "ood"
    assert split[0] == "test"  # patient a is also at the OOD site: never trained on
    assert split[2] == "val"
    with pytest.raises(InputError, match="patient 'a'"):
        assign_splits(patients, labels, sites, np.array(["train", "test", "", "", "", "", ""]))


def test_label_fractions_and_shots_take_the_right_counts():
    labels = np.r_[np.ones(100), np.zeros(900)]
    for fraction, expected in ((0.01, (1, 9)), (0.1, (10, 90)), (1.0, (100, 900)), (0.001, (1, 1))):
        chosen = training_subset(labels, seed=0, finding="ich", fraction=fraction)
        assert (int(labels[chosen].sum()), int((labels[chosen] == 0).sum())) == expected
    chosen = training_subset(labels, seed=2, finding="ich", shots=16)
    assert (int(labels[chosen].sum()), int((labels[chosen] == 0).sum())) == (16, 16)
    small = training_subset(labels, seed=2, finding="ich", fraction=0.01)
    large = training_subset(labels, seed=2, finding="ich", fraction=0.1)
    assert set(small) <= set(large)  # nested budgets
    assert not np.array_equal(small, training_subset(labels, seed=3, finding="ich", fraction=0.01))
    with pytest.raises(InputError, match="one positive and one negative"):
        training_subset(np.zeros(10), seed=0, finding="edh", fraction=0.5)
