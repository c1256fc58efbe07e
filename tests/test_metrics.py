"""Metrics, bootstrap, DeLong, splits and label budgets against known answers."""

import numpy as np
import pytest

from fmct.errors import InputError
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fmct.eval import metrics as M
from fmct.eval.splits import assign_splits, training_subset

# Hanley & McNeil (1982), Table 1: CT ratings 1 (definitely normal) .. 5 (definitely abnormal).
HM_NORMAL_COUNTS = [33, 6, 6, 11, 2]  # 58 truly normal
HM_ABNORMAL_COUNTS = [3, 2, 2, 11, 33]  # 51 truly abnormal


def _hanley_mcneil():
    scores = np.concatenate([np.repeat(np.arange(1, 6), HM_NORMAL_COUNTS), np.repeat(np.arange(1, 6), HM_ABNORMAL_COUNTS)])
    labels = np.concatenate([np.zeros(58), np.ones(51)])
    return labels, scores.astype(float)


def test_hanley_mcneil_auc_by_hand_and_delong_by_brute_force():
    labels, scores = _hanley_mcneil()
    # By hand: P(abnormal rated higher) + 1/2 P(tie), over the 58 x 51 pairs.
    higher = sum(a * sum(HM_NORMAL_COUNTS[:i]) for i, a in enumerate(HM_ABNORMAL_COUNTS))
    ties = sum(a * n for a, n in zip(HM_ABNORMAL_COUNTS, HM_NORMAL_COUNTS))
    expected = (higher + 0.5 * ties) / (58 * 51)
    assert round(expected, 3) == 0.893  # the paper's value
    assert float(M.auroc(labels, scores)) == pytest.approx(expected, abs=1e-12)

    # DeLong's variance from the pairwise kernel psi, computed the slow way.
    positive, negative = scores[labels == 1], scores[labels == 0]
    psi = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / len(positive) + v01.var(ddof=1) / len(negative)
    aucs, cov = M.delong(labels, scores[None, :])
    assert aucs[0] == pytest.approx(expected, abs=1e-12)
    assert cov[0, 0] == pytest.approx(variance, rel=1e-10)
    assert np.sqrt(cov[0, 0]) == pytest.approx(0.0315, abs=0.002)  # Hanley & McNeil's SE is 0.0333


def test_metrics_match_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(6, 80))
        labels = rng.integers(0, 2, n).astype(float)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n) / 5.0 if trial % 2 else rng.normal(size=n)
        assert float(M.auroc(labels, scores)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert float(M.average_precision(labels, scores)) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        for specificity in (0.90, 0.95):
            expected = tpr[fpr <= 1 - specificity + 1e-12].max()
            assert float(M.sensitivity_at_specificity(labels, scores, specificity)) == pytest.approx(expected, abs=1e-12)
        weights = rng.integers(1, 4, n).astype(float)
        assert float(M.auroc(labels, scores, weights)) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)


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
    assert M.percentile_interval(replicates["sens_at_spec95"]) == (1.0, 1.0)
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


def test_delong_paired_test():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    signal = labels + rng.normal(0, 1.0, 300)
    same = M.delong_test(labels, signal, signal)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = labels + rng.normal(0, 0.3, 300)
    test = M.delong_test(labels, better, signal)
    assert test["auroc_a"] > test["auroc_b"] and test["p_value"] < 1e-6
    noisy = signal + rng.normal(0, 0.05, 300)  # nearly the same ranking: no evidence of a difference
    assert M.delong_test(labels, noisy, signal)["p_value"] > 0.05


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
