"""Train / val / test splits by patient, and label-efficient training subsets.

Split names: ``train``, ``val``, ``test`` (in-distribution test) and ``ood`` (test scans of a held-out
site). Rules, in order of precedence:

1. Scans of an ``ood_sites`` site are test-only: ``ood``. The other scans of a patient seen at such a site
   go to ``test``, so no patient of the OOD set is ever trained on.
2. An explicit split (a ``split`` column in the labels: train, val or test) wins for its scan.
3. The remaining patients are assigned whole (no patient in two splits), stratified per finding by
   iterative stratification: patients carrying the rarest findings are placed first, each into the
   split furthest below its target count of that finding; patients without a positive fill the split
   furthest below its target scan count. Fixed by ``seed``.
"""

from __future__ import annotations

import zlib

import numpy as np

from fmct.errors import InputError

SPLITS = ("train", "val", "test")


def assign_splits(
    patient_ids: np.ndarray,
    labels: np.ndarray,
    sites: np.ndarray | None = None,
    explicit: np.ndarray | None = None,
    ood_sites: tuple[str, ...] = (),
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """The split of every scan: an array of ``train|val|test|ood`` strings of length n_scans.

    Args:
        patient_ids: (n,) patient of each scan.
        labels: (n, F) float array: 1 positive, 0 negative, NaN unknown, per finding.
        sites: (n,) site of each scan ("" when unknown).
        explicit: (n,) split given by the user ("" where not given).
        ood_sites: sites whose scans are test-only (out-of-distribution).
        val_fraction, test_fraction: shares of scans to aim for in val and test.
        seed: fixes the order in which patients are placed.
    """
    patient_ids = np.asarray(patient_ids).astype(str)
    n = len(patient_ids)
    labels = np.asarray(labels, dtype=np.float64).reshape(n, -1)
    sites = np.full(n, "") if sites is None else np.asarray(sites).astype(str)
    explicit = np.full(n, "") if explicit is None else np.asarray(explicit).astype(str)
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise InputError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave room for train")
    unknown = sorted(set(explicit) - set(SPLITS) - {""})
    if unknown:
        raise InputError(f"split column holds {unknown[0]!r}; allowed: train, val, test or empty")

    split = np.where(explicit != "", explicit, "").astype("<U5")
    is_ood = np.isin(sites, list(ood_sites))
    split[is_ood] = "ood"
    patients_at_ood_site = np.isin(patient_ids, patient_ids[is_ood])
    split[patients_at_ood_site & ~is_ood] = "test"

    placed: dict[str, str] = {}
    for patient, name in zip(patient_ids[split != ""].tolist(), split[split != ""].tolist()):
        if name == "ood":
            continue
        if placed.setdefault(patient, name) != name:
            raise InputError(
                f"patient {patient!r} has scans in both {placed[patient]} and {name} (split column); "
                "a patient must stay in one"
            )
    free = split == ""
    # Scans without a split follow their patient's other scans.
    for i in np.flatnonzero(free):
        if patient_ids[i] in placed:
            split[i] = placed[patient_ids[i]]
    free = split == ""
    if free.any():
        split[free] = _stratified_patient_split(patient_ids[free], labels[free], val_fraction, test_fraction, seed)
    return split


def _stratified_patient_split(
    patient_ids: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    patients, patient_index = np.unique(patient_ids, return_inverse=True)
    n_patients, n_findings = len(patients), labels.shape[1]
    scans_per_patient = np.bincount(patient_index, minlength=n_patients).astype(float)
    positives_per_patient = np.zeros((n_patients, n_findings))
    np.add.at(positives_per_patient, patient_index, np.nan_to_num(labels, nan=0.0) == 1)

    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    target_scans = fractions * scans_per_patient.sum()
    target_positives = fractions[:, None] * positives_per_patient.sum(axis=0)[None, :]
    have_scans = np.zeros(3)
    have_positives = np.zeros((3, n_findings))

    rng = np.random.default_rng(seed)
    finding_totals = positives_per_patient.sum(axis=0)
    # A patient's rarity: the total count of its rarest positive finding (inf without a positive).
    rarity = np.where(positives_per_patient > 0, finding_totals[None, :], np.inf).min(axis=1, initial=np.inf)
    shuffled = rng.permutation(n_patients)
    order = shuffled[np.argsort(rarity[shuffled], kind="stable")]

    assigned = np.empty(n_patients, dtype=int)
    for patient in order:
        noise = rng.random(3) * 1e-6  # breaks exact ties at random, reproducibly
        if np.isfinite(rarity[patient]):
            rarest = np.argmin(np.where(positives_per_patient[patient] > 0, finding_totals, np.inf))
            deficit = target_positives[:, rarest] - have_positives[:, rarest]
            deficit = deficit + 1e-3 * (target_scans - have_scans) / max(target_scans.sum(), 1.0)
        else:
            deficit = target_scans - have_scans
        choice = int(np.argmax(deficit + noise))
        assigned[patient] = choice
        have_scans[choice] += scans_per_patient[patient]
        have_positives[choice] += positives_per_patient[patient]
    return np.asarray(SPLITS)[assigned[patient_index]]


def training_subset(
    labels: np.ndarray,
    seed: int,
    finding: str,
    fraction: float | None = None,
    shots: int | None = None,
) -> np.ndarray:
    """Indices into ``labels`` (the known 0/1 labels of the training scans of one finding) to train on.

    ``fraction``: round(fraction x positives) positives and round(fraction x negatives) negatives, so the
    subset keeps the training prevalence. ``shots``: N positives and N negatives (class-balanced, as
    few-shot is defined in FM-CT), capped at what exists. Either way at least one of each class.
    Subsets are nested: for one seed and finding, a smaller budget takes a prefix of the same random
    order, so 1% of the labels lies inside 10%.
    """
    labels = np.asarray(labels)
    if (fraction is None) == (shots is None):
        raise ValueError("give exactly one of fraction or shots")
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(positives) == 0 or len(negatives) == 0:
        raise InputError(f"finding {finding}: the training split needs at least one positive and one negative")
    rng = np.random.default_rng([seed, zlib.crc32(finding.encode())])
    positives, negatives = rng.permutation(positives), rng.permutation(negatives)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise InputError(f"label fraction {fraction} must be in (0, 1]")
        n_positive = max(1, int(np.floor(fraction * len(positives) + 0.5)))
        n_negative = max(1, int(np.floor(fraction * len(negatives) + 0.5)))
    else:
        if shots < 1:
            raise InputError(f"shots {shots} must be at least 1")
        n_positive, n_negative = min(shots, len(positives)), min(shots, len(negatives))
    return np.sort(np.concatenate([positives[:n_positive], negatives[:n_negative]]))
