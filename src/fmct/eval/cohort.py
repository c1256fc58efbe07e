"""The labelled cohort that ``fmct probe`` and ``fmct finetune`` train and test on: its labels, its
splits by patient, the label budgets, and the prediction rows both verbs write.

Labels come from a labels file (:func:`fmct.datasets.load_labels`); splits from
:func:`fmct.eval.splits.assign_splits` (by patient, stratified, the ``split`` column wins, OOD sites
test-only), fixed by ``split_seed``; each (budget, seed) draws its own training subset
(:func:`fmct.eval.splits.training_subset`), nested across budgets.

Patients are told apart by the labels' ``patient_id`` (else the store's patient key, else the scan
itself), but only through its keyed pseudonym (:func:`fmct.pseudonym.patient_pseudonyms`, the same
that ingest makes of a PatientID): an identifier in a labels file never reaches a split or an output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmct.datasets import load_labels, match_to_store
from fmct.errors import ConfigError, InputError
from fmct.eval import metrics as M
from fmct.eval.splits import assign_splits, training_subset
from fmct.pseudonym import patient_pseudonyms
from fmct.store import Store
from fmct.synth.cohort import made_by_synth

EVALUATED_SPLITS = ("test", "ood")
GROUPS = {"test": "ID", "ood": "OOD"}  # evaluated split -> site group
SPLITS = ("train", "val", "test", "ood")
NOT_RECORDED = "not recorded"  # a scanner the store's manifest does not name, or no store at all


@dataclass
class CohortConfig:
    """Which labelled scans a fit sees: findings, splits and label budgets (shared by probe and finetune)."""

    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    shots: tuple[int, ...] = ()  # N positives and N negatives per finding, in addition to the fractions
    seeds: int = 5  # seeds first_seed .. first_seed + seeds - 1, each its own training subset
    # Where the seeds start: a run's seeds can be split over processes (the demo runs each fit in its own)
    # and the folders evaluated together, since a seed draws the same subset and weights wherever it runs.
    first_seed: int = 0
    split_seed: int = 0
    use_split_column: bool = True  # false: ignore the labels' split column, split every scan by the fractions below
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    ood_sites: tuple[str, ...] = ()  # sites whose scans are test-only (out-of-distribution)
    findings: tuple[str, ...] = ()  # empty: every finding of the labels

    def __post_init__(self) -> None:
        if any(not 0 < f <= 1 for f in self.label_fractions) or any(n < 1 for n in self.shots):
            raise ConfigError("label_fractions must lie in (0, 1] and shots be at least 1")
        if (
            self.seeds < 1
            or self.first_seed < 0
            or not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1)
        ):
            raise ConfigError(
                "seeds must be at least 1, first_seed at least 0, "
                "val_fraction and test_fraction >= 0 with a sum below 1"
            )

    def seed_range(self) -> range:
        """The seeds to fit, each its own training subset."""
        return range(self.first_seed, self.first_seed + self.seeds)

    def budgets(self) -> list[Budget]:
        """Every label budget to fit: the fractions, then the shots."""
        return [Budget(fraction=f) for f in self.label_fractions] + [Budget(shots=n) for n in self.shots]


@dataclass(frozen=True)
class Budget:
    """A label budget: a fraction of the training labels, or N positives and N negatives."""

    fraction: float | None = None
    shots: int | None = None

    @property
    def name(self) -> str:
        """The budget in a folder name: ``fraction0.1`` or ``shots16``."""
        return f"fraction{self.fraction:g}" if self.fraction is not None else f"shots{self.shots}"

    def columns(self) -> dict:
        """The budget as the ``label_fraction`` and ``shots`` columns of predictions and fit records."""
        return {
            "label_fraction": "" if self.fraction is None else self.fraction,
            "shots": "" if self.shots is None else self.shots,
        }


@dataclass
class Cohort:
    """The labelled scans with their splits.

    ``labels`` (n_scans, n_findings) float: 1, 0 or NaN (unknown), row i for ``scan_ids[i]``, column f
    for ``findings[f]``. ``patients`` (pseudonyms: what splits group by and predictions name), ``sites``
    and ``split`` (train | val | test | ood) are (n_scans,) string arrays. ``origin`` is the labels file;
    ``notes`` say which label rows could not be used. ``scanners`` (n_scans,): each scan's manufacturer
    and model from the store's manifest (:func:`scanner_name`), None without a store.
    """

    scan_ids: list[str]
    findings: list[str]
    labels: np.ndarray
    patients: np.ndarray
    sites: np.ndarray
    split: np.ndarray
    origin: str
    notes: list[str]
    scanners: np.ndarray | None = None

    @property
    def synthetic(self) -> bool:
        """True for a cohort ``fmct synth`` drew (:func:`fmct.synth.cohort.made_by_synth`): its figures say
        nothing about real CT, and every card and report built on it says so."""
        return made_by_synth(self.origin)

    def rows(self, finding: int, splits: tuple[str, ...]) -> np.ndarray:
        """Indices of the scans in ``splits`` whose label of ``finding`` is known."""
        return np.flatnonzero(~np.isnan(self.labels[:, finding]) & np.isin(self.split, splits))

    def untrainable_reason(self, finding: int) -> str | None:
        """Why ``finding`` cannot be fitted and evaluated (one line), or None when it can."""
        if len(set(self.labels[self.rows(finding, ("train",)), finding].tolist())) < 2 or not len(
            self.rows(finding, EVALUATED_SPLITS)
        ):
            return (
                f"{self.findings[finding]}: the training split needs a positive and a negative, "
                "and a test scan must exist"
            )
        return None

    def training_rows(self, finding: int, budget: Budget, seed: int) -> np.ndarray:
        """The training scans of ``finding`` that ``budget`` and ``seed`` choose (nested across budgets)."""
        train = self.rows(finding, ("train",))
        return train[
            training_subset(
                self.labels[train, finding], seed, self.findings[finding], fraction=budget.fraction, shots=budget.shots
            )
        ]

    def prediction(self, row: int, finding: int, score: float, model: str, arm: str, budget: Budget, seed: int) -> dict:
        """One row of ``predictions.csv`` (the format of :mod:`fmct.eval.evaluate`)."""
        return {
            "scan_id": self.scan_ids[row],
            "patient_id": self.patients[row],
            "site": self.sites[row],
            "split": self.split[row],
            "finding": self.findings[finding],
            "label": int(self.labels[row, finding]),
            "score": float(score),
            "model": model,
            "arm": arm,
            "seed": seed,
            **budget.columns(),
        }

    def fit_metrics(
        self,
        finding: int,
        rows: np.ndarray,
        scores: np.ndarray,
        thresholds: dict[str, float],
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> dict[str, dict]:
        """What one fit's ``scores`` of ``rows`` (cohort rows of ``finding``, known labels) reach, per site
        group (ID: test, OOD: ood): AUROC, and sensitivity and specificity at each of ``thresholds``
        ({name: score}, positive when score >= threshold), each with its patient-level bootstrap 95 % CI,
        and the counts behind them. A group without a positive and a negative gets counts only."""
        results = {}
        for split, group in GROUPS.items():
            part = rows[self.split[rows] == split]
            if not len(part):
                continue
            labels, values = self.labels[part, finding], scores[self.split[rows] == split]
            result = {"n_scans": int(len(part)), "n_pos": int(np.sum(labels == 1)), "n_neg": int(np.sum(labels == 0))}
            if result["n_pos"] and result["n_neg"]:
                weights = np.vstack(
                    [np.ones((1, len(part))), M.patient_bootstrap_weights(self.patients[part], n_bootstrap, seed)]
                )
                auc = M.auroc(labels, values, weights)
                result["auroc"], (result["auroc_lo"], result["auroc_hi"]) = (
                    float(auc[0]),
                    M.percentile_interval(auc[1:]),
                )
                for name, threshold in thresholds.items():
                    called = values >= threshold
                    with np.errstate(invalid="ignore", divide="ignore"):
                        sensitivity = (weights * (called & (labels == 1))).sum(1) / (weights * (labels == 1)).sum(1)
                        specificity = (weights * (~called & (labels == 0))).sum(1) / (weights * (labels == 0)).sum(1)
                    for what, value in (("sensitivity", sensitivity), ("specificity", specificity)):
                        result[f"{what}_{name}"] = float(value[0])
                        result[f"{what}_{name}_lo"], result[f"{what}_{name}_hi"] = M.percentile_interval(value[1:])
            results[group] = result
        return results

    def split_counts(self) -> dict:
        """Scans per split, positives/negatives per finding and split, and the cohort table per site and
        split (:func:`site_split_table`), and whether the cohort is synthetic, as run.json records them."""
        scans = {name: int(np.sum(self.split == name)) for name in SPLITS}
        scanners = self.scanners if self.scanners is not None else np.full(len(self.scan_ids), NOT_RECORDED)
        return {
            "scans_per_split": scans,
            "labels_per_split": self.label_counts(),
            "synthetic": self.synthetic,
            "cohort": site_split_table(self.patients, self.sites, self.split, scanners, self.findings, self.labels),
        }

    def label_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Positives and negatives per finding and split: ``{finding: {split: {"pos", "neg"}}}``."""
        counts = {}
        for f, finding in enumerate(self.findings):
            known = ~np.isnan(self.labels[:, f])
            counts[finding] = {
                name: {
                    kind: int(np.sum(self.labels[known & (self.split == name), f] == value))
                    for kind, value in (("pos", 1), ("neg", 0))
                }
                for name in SPLITS
            }
        return counts


def scanner_name(manifest_row: dict) -> str:
    """A scan's scanner as the store's manifest records it: ``manufacturer model``, or :data:`NOT_RECORDED`."""
    return " ".join(str(manifest_row.get(k) or "").strip() for k in ("manufacturer", "model")).strip() or NOT_RECORDED


def site_split_table(
    patients: np.ndarray,
    sites: np.ndarray,
    split: np.ndarray,
    scanners: np.ndarray,
    findings: list[str],
    labels: np.ndarray,
) -> list[dict]:
    """The cohort per site and split, one dict per (site, split) that has scans, in split order then site,
    each split of several sites followed by its total (``all_sites`` true, patients counted once):
    ``site, split, all_sites, n_scans, n_patients, scanners`` ({scanner name: scans}) and ``labels``
    ({finding: {"pos", "neg"}}; unknown labels are in neither). Arrays are (n_scans,) per scan, ``labels``
    (n_scans, n_findings) 1/0/NaN. Patients are counted, never named."""

    def row(site: str, name: str, mine: np.ndarray, all_sites: bool) -> dict:
        names, counts = np.unique(scanners[mine], return_counts=True)
        return {
            "site": site,
            "split": name,
            "all_sites": all_sites,
            "n_scans": int(mine.sum()),
            "n_patients": len(set(patients[mine].tolist())),
            "scanners": {str(n): int(c) for n, c in sorted(zip(names, counts), key=lambda nc: (-nc[1], nc[0]))},
            "labels": {
                finding: {"pos": int(np.sum(labels[mine, f] == 1)), "neg": int(np.sum(labels[mine, f] == 0))}
                for f, finding in enumerate(findings)
            },
        }

    order = {name: i for i, name in enumerate(SPLITS)}
    table = []
    for name in sorted(set(split.tolist()), key=lambda s: (order.get(s, len(order)), s)):
        in_split = split == name
        split_sites = sorted(set(sites[in_split].tolist()))
        table += [row(site, name, in_split & (sites == site), False) for site in split_sites]
        if len(split_sites) > 1:
            table.append(row("", name, in_split, True))
    return table


def load_cohort(
    labels_spec: str,
    available_scan_ids,
    where: str,
    config: CohortConfig,
    store_path: str | os.PathLike | None = None,
    rename: dict[str, str] | None = None,
) -> Cohort:
    """The labelled scans among ``available_scan_ids`` (those with features: ``where`` names them in
    messages), split by patient as :func:`fmct.eval.splits.assign_splits` does.

    Rows keyed by ``source`` need ``store_path``, whose manifest also supplies patient keys for rows
    without a patient_id (without either, each scan is its own patient). Bad labels raise
    :class:`InputError` naming the file.
    """
    labels = load_labels(labels_spec, rename)
    notes = list(labels.notes)
    rows, store_rows = _label_rows(labels, store_path, notes)
    store_patient_keys = {row["scan_id"]: row.get("patient_key", "") for row in store_rows}
    findings = list(config.findings) or labels.findings
    unknown = sorted(set(findings) - set(labels.findings))
    if unknown:
        raise InputError(f"{labels.origin}: no finding {unknown[0]!r} (findings: {', '.join(labels.findings)})")
    row_of_scan = {}
    for row in rows:
        if row["scan_id"] in row_of_scan:
            raise InputError(f"{labels.origin}: scan {row['scan_id']} is labelled twice")
        row_of_scan[row["scan_id"]] = row
    available = set(str(s) for s in available_scan_ids)
    scan_ids = [s for s in row_of_scan if s in available]
    if len(scan_ids) < len(row_of_scan):
        notes.append(f"{len(row_of_scan) - len(scan_ids)} labelled scans are not in {where}")
    if not scan_ids:
        raise InputError(f"{labels.origin}: no labelled scan is in {where}")

    table = [row_of_scan[s] for s in scan_ids]
    y = np.array([[np.nan if r[f] is None else r[f] for f in findings] for r in table], dtype=np.float64)
    label_patients = patient_pseudonyms([r.get("patient_id", "") for r in table])
    patients = np.array([p or store_patient_keys.get(s) or s for p, s in zip(label_patients, scan_ids)])
    sites = np.array([r.get("site", "") for r in table])
    explicit = np.array([r.get("split", "") if config.use_split_column else "" for r in table])
    split = assign_splits(
        patients,
        y,
        sites,
        explicit,
        tuple(config.ood_sites),
        config.val_fraction,
        config.test_fraction,
        config.split_seed,
    )
    scanners = None
    if store_rows:
        scanner_of = {row["scan_id"]: scanner_name(row) for row in store_rows}
        scanners = np.array([scanner_of.get(s, NOT_RECORDED) for s in scan_ids])
    return Cohort(scan_ids, findings, y, patients, sites, split, labels.origin, notes, scanners)


def _label_rows(labels, store_path: str | os.PathLike | None, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """The label rows keyed by scan id (rows keyed by source matched through the store) and the store's
    manifest rows (empty without a store)."""
    if store_path is None:
        if any(not row.get("scan_id") for row in labels.rows):
            raise InputError(f"{labels.origin}: labels keyed by source need --store to find their scans")
        return labels.rows, []
    store = Store(store_path)
    rows, unmatched = match_to_store(labels, store.rows)
    if unmatched:
        notes.append(f"{unmatched} label rows match no scan of the store")
    return rows, store.rows


@dataclass
class FitSummary:
    """What a probe or finetune run did, for its one-paragraph console summary."""

    verb: str
    n_predictions: int
    findings: list[str]
    n_fits: int
    n_fits_reused: int | None = None  # None: the verb does not keep fits to reuse
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self, out: Path) -> str:
        reused = "" if self.n_fits_reused is None else f" ({self.n_fits_reused} reused)"
        lines = [
            f"{self.verb}: {self.n_fits} fits{reused}, {self.n_predictions} predictions for "
            f"{', '.join(self.findings) or 'no finding'} -> {out / 'predictions.csv'}"
        ]
        lines += [f"  skipped {s}" for s in self.skipped] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
