"""Predictions in, metrics with patient-level bootstrap CIs and paired comparisons out (``fmct evaluate``).

The predictions format (the contract between ``probe``/``finetune`` and ``evaluate``/``report``)
---------------------------------------------------------------------------------------------------
A predictions folder holds:

- ``predictions.csv``, one row per scan x finding x label budget x seed, columns ``PREDICTION_COLUMNS``:
  ``scan_id``; ``patient_id`` (may be empty: the scan is then its own patient); ``site``;
  ``split``: ``test`` (in-distribution test) or ``ood`` (test scan of a held-out site), other splits
  (train, val) may be present and are ignored; ``finding``; ``label`` 0/1; ``score`` (higher = more
  likely positive); ``model`` (a name); ``arm`` (``pretrained``; ``scratch``: the same architecture trained
  from a random init, fine-tuned like the pretrained one at the same label budgets; ``ceiling`` (``CEILING``):
  the supervised ceiling, the same architecture from a random init fine-tuned on all the training labels
  (label fraction 1) until early stopping ends it, written by ``fmct finetune --model scratch
  --label-fractions 1 --arm ceiling``; the floors ``random-init`` and ``hu-histogram`` of ``FLOORS``);
  ``label_fraction`` (share of the training labels used, e.g. 0.01); ``seed`` (of the training subset and
  fit); and the optional
  ``shots`` (N positives and N negatives trained on; ``label_fraction`` is then empty).
  Optional columns (``OPTIONAL_COLUMNS``): ``probability`` (a calibrated probability in [0, 1]: the
  calibration plot uses it; without it, the logistic of the score, labelled uncalibrated) and
  ``threshold_spec90`` / ``threshold_spec95`` (decision thresholds on ``probability`` chosen on the
  validation split to reach 90% / 95% specificity: a scan is positive when its probability is at least
  the threshold, and the operating points use them; without them, the thresholds are set on the test
  set's scores itself, labelled optimistic).
- ``run.json``: the config and model identity behind the scores (embeddings or checkpoint path and its
  sha256, method, splits, the cohort table per site and split, the fits with their training-set sizes...).
  ``evaluate`` and ``report`` copy it next to every number. A fine-tuning fit records ``ended_by``
  (``early_stopping`` or ``max_steps``), ``steps`` and ``best_step``: :func:`fit_endings` collects them
  (``unknown`` where a fit does not say, as in folders written before it did), and the report warns of
  every fit that the step cap ended rather than early stopping.

Averaging over seeds
--------------------
Each seed is one training subset and fit, i.e. one model a user could have trained; the quantity of
interest is the metric a user can expect, not that of an ensemble of seeds. So every metric is computed
per seed and then averaged over seeds, and its 95% CI comes from a patient-level bootstrap of that
seed-averaged metric: each replicate resamples patients (all their scans together), recomputes the
metric of every seed on that resample, and averages. The spread over seeds alone is reported as
``auroc_seed_sd``. The same resampled patients serve every model and arm of a finding and site group,
which makes the paired comparisons paired. A set with fewer than ``metrics.MIN_PER_CLASS`` positives or
negatives is not estimable: its row carries the reason in ``note`` and no metric.

Paired comparisons: one method for CI and p-value
-------------------------------------------------
For every finding, budget and site group, each pair of (model, arm) systems is compared on the scans
both scored: the difference (a - b) of their seed-averaged AUROCs, the very numbers of the metrics
table. Its 95% CI and its two-sided p-value both come from its standard error over the paired
patient-level bootstrap replicates (``metrics.bootstrap_difference_test``), so the CI excludes 0 exactly
when p < 0.05. ``primary`` marks the comparisons the verdicts rest on (a pretrained system against a
floor, or against its scratch twin); ``p_holm`` is Holm's adjustment over them (over every comparison
but the ceiling's when none is primary: :func:`holm_family`). :func:`arm_effects` reads them as
pretrained - baseline: against the scratch twin (:func:`pretraining_effects`: what pretraining buys) and
against each floor of ``FLOORS`` (a pretrained arm clears a floor where the difference's CI lies above 0).

The ceiling is compared across budgets: it exists at label fraction 1 only, and every pretrained system
at every label budget is compared with it, on the scans both scored, same finding and site group. The row
carries the pretrained system's budget (``label_fraction``, ``shots``, ``budget``); the ceiling side is
the ceiling arm's rows at its largest label fraction. Seeds pair as everywhere else: not one to one
(seed k of one arm and seed k of another are independent fits) but through the shared resampled
patients: each side's AUROC is averaged over its own seeds in every bootstrap replicate, and the
difference is taken of those averages. :func:`ceiling_effects` reads these rows as pretrained - ceiling.
They are descriptive (how far below full supervision a pretrained model at fewer labels lies): never
``primary``, never in Holm's family, so their ``p_holm`` is NaN. The ceiling is left out of the
same-budget pairs (its rows at label fraction 1 are compared only as the ceiling).

Operating points and calibration
--------------------------------
At 90% and 95% target specificity: sensitivity, specificity, PPV and NPV (at the test set's prevalence)
with bootstrap CIs, per seed then averaged. With the threshold columns the thresholds stay fixed; without
them each replicate chooses its threshold again on the resampled test scans (so the sensitivity is the
``sensitivity_spec90`` of the metrics). Calibration: the expected calibration error over 10 equal-width bins
(``ece``, with CI) and the reliability diagram's bins, pooled over seeds.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import expit

from fmct.atomic import atomic_write_text
from fmct.errors import InputError
from fmct.eval import metrics as M
from fmct.eval.cohort import GROUPS, NOT_RECORDED, scanner_name, site_split_table
from fmct.paths import located
from fmct.store import Store
from fmct.tables import rows_to_csv

PREDICTION_COLUMNS = [
    "scan_id",
    "patient_id",
    "site",
    "split",
    "finding",
    "label",
    "score",
    "model",
    "arm",
    "label_fraction",
    "seed",
    "shots",
]
# Target specificity -> the column holding the threshold chosen on validation to reach it.
OPERATING_POINTS = {0.90: "threshold_spec90", 0.95: "threshold_spec95"}
OPTIONAL_COLUMNS = ["probability", *OPERATING_POINTS.values()]
THRESHOLD_ON_VALIDATION = "threshold chosen on validation"
THRESHOLD_ON_TEST = "threshold set on the test set (optimistic)"
PROBABILITY_COLUMN = "probability column"
UNCALIBRATED = "logistic of the score (uncalibrated)"
P_VALUE_METHOD = (
    "paired patient-level bootstrap of the difference of seed-averaged AUROCs (the same resampled patients "
    "for both systems and every seed); CI = difference +- z x its bootstrap standard error and two-sided "
    "p = 2 (1 - Phi(|difference| / SE)), so the CI excludes 0 exactly when p < 1 - level; Holm's adjustment "
    "across the primary comparisons (pretrained vs each floor and vs its scratch twin); the comparisons with the "
    "supervised ceiling are descriptive and not adjusted"
)
METRIC_NAMES = ("auroc", "auprc", "sensitivity_spec90", "sensitivity_spec95")
# The floors every pretrained arm must beat (arm -> what it is), each probed like the pretrained backbone.
FLOORS = {
    "random-init": "the same architecture, randomly initialised and frozen",
    "hu-histogram": "first-order HU histogram and statistics of each scan",
}
# The supervised ceiling a pretrained arm at fewer labels is measured against (its arm name, and what it is).
CEILING = "ceiling"
CEILING_DESCRIPTION = (
    "the same architecture from a random init, fine-tuned on all the training labels until early stopping"
)
# How a fit ended (run.json ``fits[].ended_by``); UNKNOWN where the record does not say.
ENDED_BY_MAX_STEPS = "max_steps"
ENDED_BY_UNKNOWN = "unknown"
ROC_GRID = np.linspace(0.0, 1.0, 101)


# ----------------------------------------------------------------------------------- the format
def write_predictions(folder: str | os.PathLike, rows: list[dict], run: dict) -> None:
    """Write ``predictions.csv`` (columns ``PREDICTION_COLUMNS``, then any of ``OPTIONAL_COLUMNS`` a row
    has) and ``run.json`` into ``folder``, atomically."""
    folder = Path(folder)
    optional = [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
    atomic_write_text(folder / "run.json", json.dumps(run, indent=2, sort_keys=True, default=str))
    atomic_write_text(folder / "predictions.csv", rows_to_csv(rows, PREDICTION_COLUMNS + optional))


@dataclass
class Predictions:
    """One predictions folder: its rows as columns of arrays, and its run.json.

    ``columns`` holds every column of ``PREDICTION_COLUMNS`` (strings; ``label`` and ``score`` floats) and of
    ``OPTIONAL_COLUMNS`` (floats, NaN where empty or absent).
    """

    path: Path
    columns: dict[str, np.ndarray]
    run: dict = field(default_factory=dict)


def read_predictions(folder: str | os.PathLike) -> Predictions:
    """Read a predictions folder; a missing column or a bad value raises InputError naming the file."""
    folder = Path(folder)
    csv_path = folder / "predictions.csv"
    if not csv_path.exists():
        raise InputError(f"{folder}: no predictions.csv")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in PREDICTION_COLUMNS if c != "shots" and c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        raw = list(reader)
    columns = {c: np.array([row.get(c) or "" for row in raw], dtype=str) for c in PREDICTION_COLUMNS}
    try:
        for name in ("label", "score"):
            columns[name] = columns[name].astype(float)
        for name in OPTIONAL_COLUMNS:
            columns[name] = np.array([float(row.get(name) or "nan") for row in raw])
    except ValueError as error:
        raise InputError(f"{csv_path}: label, score, probability and thresholds must be numbers ({error})") from None
    if not np.all(np.isin(columns["label"], (0.0, 1.0))):
        raise InputError(f"{csv_path}: label must be 0 or 1")
    if not np.all(np.isfinite(columns["score"])):
        raise InputError(f"{csv_path}: score must be finite")
    probability = columns["probability"]
    if np.any((probability < 0) | (probability > 1)):
        raise InputError(f"{csv_path}: probability must lie in [0, 1]")
    run_path = folder / "run.json"
    try:
        run = json.loads(run_path.read_text()) if run_path.exists() else {}
    except json.JSONDecodeError as error:
        raise InputError(f"{run_path}: not JSON ({error})") from None
    return Predictions(path=folder, columns=columns, run=run)


def budget_name(label_fraction: str, shots: str) -> str:
    """How a label budget is shown: ``0.1`` for a label fraction, ``16 shots`` for N shots."""
    return f"{shots} shots" if shots else label_fraction


def training_sizes(predictions: Predictions) -> np.ndarray:
    """Per prediction row, the number of labelled scans its fit trained on (NaN where run.json does not say).

    Read from run.json's ``fits``: probe records ``finding, n_train_pos, n_train_neg`` per fit, finetune
    ``per_finding: {finding: {n_train_pos, n_train_neg}}``; both with ``label_fraction, shots, seed``.
    """
    sizes = {}
    for fit in predictions.run.get("fits") or []:
        per_finding = fit.get("per_finding") or ({fit["finding"]: fit} if "finding" in fit else {})
        for finding, counts in per_finding.items():
            if "n_train_pos" in counts and "n_train_neg" in counts:
                key = (
                    finding,
                    _number_key(fit.get("label_fraction")),
                    _number_key(fit.get("shots")),
                    _number_key(fit.get("seed")),
                )
                sizes[key] = counts["n_train_pos"] + counts["n_train_neg"]
    c = predictions.columns
    return np.array(
        [
            sizes.get((f, _number_key(fraction), _number_key(shots), _number_key(seed)), np.nan)
            for f, fraction, shots, seed in zip(c["finding"], c["label_fraction"], c["shots"], c["seed"])
        ],
        dtype=np.float64,
    )


def fit_endings(runs: list[dict]) -> list[dict]:
    """How each fit ended, per (model, arm, label_fraction, shots, seed) of each predictions folder: rows of
    ``FIT_COLUMNS`` with ``ended_by`` (``early_stopping``; ``max_steps``: the step cap ended it; or
    ``unknown`` where the fit record does not say: probe fits, and folders written before finetune recorded
    it), ``steps`` and ``best_step`` (NaN where not recorded).

    ``runs``: :attr:`Evaluation.runs` (``{"path", "run"}``); model and arm are run.json's.
    """
    endings: dict[tuple, dict] = {}
    for entry in runs:
        run = entry["run"]
        for fit in run.get("fits") or []:
            row = {
                "path": entry["path"],
                "model": str(run.get("model") or ""),
                "arm": str(run.get("arm") or ""),
                "label_fraction": _text(fit.get("label_fraction")),
                "shots": _text(fit.get("shots")),
                "seed": _text(fit.get("seed")),
                "ended_by": str(fit.get("ended_by") or ENDED_BY_UNKNOWN),
                "steps": _float(fit.get("steps")),
                "best_step": _float(fit.get("best_step")),
            }
            # A probe records one fit per finding: the first of a (budget, seed) stands for them.
            endings.setdefault(tuple(row[c] for c in FIT_COLUMNS[:6]), row)
    return list(endings.values())


def _text(value) -> str:
    return "" if value is None else str(value)


def _number_key(value) -> str:
    """``0.1``, ``"0.1"`` and ``"0.10"`` alike (budgets and seeds as run.json and predictions.csv write them)."""
    if value is None or value == "":
        return ""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


# -------------------------------------------------------------------------------------- the cohort
def cohort_tables(loaded: list[Predictions]) -> list[dict]:
    """The cohort table (:func:`fmct.eval.cohort.site_split_table`) of each predictions folder, identical
    tables merged: ``{"folders": [...], "source", "rows"}``.

    From run.json's ``cohort`` record (every split, scanners from the store) when it has one; else from the
    predictions themselves (the evaluated splits only), with scanners from the manifest of the store that
    run.json names, when that store is there.
    """
    tables: list[dict] = []
    for p in loaded:
        if p.run.get("cohort"):
            rows, source = p.run["cohort"], "run.json"
        else:
            rows, source = _cohort_from_predictions(p), "predictions.csv (evaluated splits only)"
        same = next((t for t in tables if t["rows"] == rows), None)
        if same:
            same["folders"].append(str(p.path))
        else:
            tables.append({"folders": [str(p.path)], "source": source, "rows": rows})
    return tables


def _cohort_from_predictions(p: Predictions) -> list[dict]:
    c = p.columns
    scan_ids, first = np.unique(c["scan_id"], return_index=True)
    findings = sorted(set(c["finding"].tolist()))
    labels = np.full((len(scan_ids), len(findings)), np.nan)
    labels[np.searchsorted(scan_ids, c["scan_id"]), np.searchsorted(findings, c["finding"])] = c["label"]
    patients = np.where(c["patient_id"][first] != "", c["patient_id"][first], scan_ids)
    scanner_of = _store_scanners(located(p.run["store"], p.path) if p.run.get("store") else None)
    scanners = np.array([scanner_of.get(s, NOT_RECORDED) for s in scan_ids])
    return site_split_table(patients, c["site"][first], c["split"][first], scanners, findings, labels)


def _store_scanners(store_path: Path | None) -> dict[str, str]:
    """Scan id -> scanner from the manifest of the store run.json names (empty when it is not there)."""
    if not store_path or not (Path(store_path) / "scans").is_dir():
        return {}
    return {row["scan_id"]: scanner_name(row) for row in Store(store_path).rows}


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    metrics: list[dict]
    comparisons: list[dict]
    roc: list[dict]
    runs: list[dict]
    settings: dict
    operating_points: list[dict] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    cohorts: list[dict] = field(default_factory=list)
    fits: list[dict] = field(default_factory=list)  # how each fit ended: fit_endings(runs)


def evaluate(
    folders: list[str | os.PathLike], n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> Evaluation:
    """Metrics per (model, arm, finding, budget, site group) with CIs, paired comparisons with Holm-adjusted
    p-values (the pretrained systems against the ceiling included), operating points, calibration, the
    cohort tables and how each fit ended (:func:`fit_endings`).

    Only rows of split ``test`` (group ID) and ``ood`` (group OOD) count. See the module docstring for
    how seeds are averaged and how pairs are compared.
    """
    loaded = [read_predictions(f) for f in folders]
    _check_each_fit_once(loaded)
    for p in loaded:
        p.columns["n_train"] = training_sizes(p)
    names = PREDICTION_COLUMNS + OPTIONAL_COLUMNS + ["n_train"]
    table = {c: np.concatenate([p.columns[c] for p in loaded]) for c in names}
    keep = np.isin(table["split"], list(GROUPS))
    table = {c: v[keep] for c, v in table.items()}
    if not keep.any():
        raise InputError("no prediction has split test or ood: nothing to evaluate")
    table["group"] = np.array([GROUPS[s] for s in table["split"]])
    table["patient"] = np.where(table["patient_id"] != "", table["patient_id"], table["scan_id"])
    settings = {
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "level": level,
        "min_per_class": M.MIN_PER_CLASS,
        "p_value_method": P_VALUE_METHOD,
    }

    runs = [{"path": str(p.path), "run": p.run} for p in loaded]
    evaluation = Evaluation([], [], [], runs, settings, cohorts=cohort_tables(loaded), fits=fit_endings(runs))
    for finding in sorted(set(table["finding"])):
        for group in ("ID", "OOD"):
            part = (table["finding"] == finding) & (table["group"] == group)
            if part.any():
                cell = _Cell({c: v[part] for c, v in table.items()}, finding, group, n_bootstrap, seed)
                evaluation.metrics += cell.metric_rows(level)
                evaluation.comparisons += cell.comparison_rows(level)
                evaluation.roc += cell.roc_rows()
                evaluation.operating_points += cell.operating_point_rows(level)
                evaluation.calibration += cell.calibration_rows()
    evaluation.comparisons = with_holm(evaluation.comparisons)
    return evaluation


def _check_each_fit_once(loaded: list[Predictions]) -> None:
    """Folders are read together as one run per (model, arm), its seeds split over them or not (``fmct
    finetune --first-seed``); a fit, (model, arm, finding, budget, seed), in two of them would be counted
    twice, so it raises InputError naming both."""
    seen: dict[tuple, Path] = {}
    for p in loaded:
        c = p.columns
        for model, arm, finding, fraction, shots, seed in set(
            zip(c["model"], c["arm"], c["finding"], c["label_fraction"], c["shots"], c["seed"])
        ):
            fit = (model, arm, finding, _number_key(fraction), _number_key(shots), _number_key(seed))
            if seen.setdefault(fit, p.path) != p.path:
                raise InputError(
                    f"{seen[fit]} and {p.path}: both hold the fit of {model} ({arm}), {finding}, "
                    f"budget {budget_name(fraction, shots)}, seed {seed}; give each fit once"
                )


def holm_family(comparisons: list[dict]) -> list[bool]:
    """Which comparisons Holm's adjustment runs over: the primary ones (a pretrained system against a floor
    or its scratch twin, the ones the report's verdicts rest on) when there is one, else every comparison
    but those with the ceiling, which are descriptive and never in the family."""
    family = [bool(c.get("primary")) for c in comparisons]
    if not any(family):
        family = [not is_ceiling_comparison(c) for c in comparisons]
    return family


def is_ceiling_comparison(comparison: dict) -> bool:
    """Whether a comparison row is one with the supervised ceiling (``CEILING``)."""
    return CEILING in (comparison["arm_a"], comparison["arm_b"])


def with_holm(comparisons: list[dict]) -> list[dict]:
    """The comparisons with ``p_holm``: Holm's adjustment of ``p_bootstrap`` over :func:`holm_family`. Not
    estimable ones have no p-value and are not in the family; outside it ``p_holm`` is NaN (exploratory or
    descriptive, unadjusted)."""
    family = holm_family(comparisons)
    adjusted = M.holm(
        [_float(c.get("p_bootstrap")) if member else float("nan") for c, member in zip(comparisons, family)]
    )
    return [{**c, "p_holm": float(p)} for c, p in zip(comparisons, adjusted)]


def _is_primary(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether systems ``a`` and ``b`` (model, arm) are a pretrained system and a floor, or a pretrained
    model and its scratch twin (same model name): the pairs of :func:`arm_effects` the verdicts rest on
    (not the ceiling's, which are descriptive)."""
    (model_a, arm_a), (model_b, arm_b) = a, b
    arms = {arm_a, arm_b}
    return "pretrained" in arms and (
        bool(arms & set(FLOORS)) or (arms == {"pretrained", "scratch"} and model_a == model_b)
    )


class _Cell:
    """All predictions of one finding and site group, aligned on one list of scans.

    ``scores[system, budget]`` is an (n_seeds, n_scans) array with a matching 0/1 ``present`` mask: a scan a
    system did not score weighs 0, so every system shares the scan axis and the bootstrap weights.
    ``probabilities`` is the same with the optional probability column (NaN where absent); ``thresholds``
    holds per target specificity an (n_seeds,) array of validation thresholds (NaN where absent);
    ``n_train`` the (n_seeds,) training-set sizes.
    """

    def __init__(self, rows: dict, finding: str, group: str, n_bootstrap: int, seed: int):
        self.finding, self.group = finding, group
        self.scan_ids, scan_index = np.unique(rows["scan_id"], return_inverse=True)
        labels = np.full(len(self.scan_ids), np.nan)
        for i, label in zip(scan_index, rows["label"]):
            if not np.isnan(labels[i]) and labels[i] != label:
                raise InputError(f"scan {self.scan_ids[i]}, finding {finding}: two predictions disagree on its label")
            labels[i] = label
        self.labels = labels
        patients = np.empty(len(self.scan_ids), dtype=object)
        patients[scan_index] = rows["patient"]
        self.patients = patients.astype(str)
        sites = np.empty(len(self.scan_ids), dtype=object)
        sites[scan_index] = rows["site"]
        self.sites = sorted(set(sites.astype(str)) - {""})
        # Row 0 is the point estimate (every scan once); rows 1.. are the bootstrap replicates.
        # The seed depends on finding and group only, so all systems of this cell see the same resamples.
        cell_seed = [seed, *map(ord, f"{finding}/{group}")]
        self.weights = np.vstack(
            [
                np.ones((1, len(self.scan_ids))),
                M.patient_bootstrap_weights(
                    self.patients, n_bootstrap, seed=np.random.SeedSequence(cell_seed).generate_state(1)[0]
                ),
            ]
        )

        self.scores: dict[tuple, np.ndarray] = {}
        self.present: dict[tuple, np.ndarray] = {}
        self.probabilities: dict[tuple, np.ndarray] = {}
        self.thresholds: dict[tuple, dict[float, np.ndarray]] = {}
        self.n_train: dict[tuple, np.ndarray] = {}
        self.seeds: dict[tuple, list[str]] = {}
        keys = zip(rows["model"], rows["arm"], rows["label_fraction"], rows["shots"])
        groups: dict[tuple, list[int]] = {}
        for i, (model, arm, fraction, shots) in enumerate(keys):
            groups.setdefault(((model, arm), (fraction, shots)), []).append(i)
        for key, members in groups.items():
            members = np.asarray(members)
            seeds = sorted(set(rows["seed"][members]), key=_numeric_first)
            shape = (len(seeds), len(self.scan_ids))
            scores, present, probabilities = np.zeros(shape), np.zeros(shape), np.full(shape, np.nan)
            thresholds = {target: np.full(len(seeds), np.nan) for target in OPERATING_POINTS}
            n_train = np.full(len(seeds), np.nan)
            for s, seed_name in enumerate(seeds):
                mine = members[rows["seed"][members] == seed_name]
                scores[s, scan_index[mine]] = rows["score"][mine]
                present[s, scan_index[mine]] = 1.0
                probabilities[s, scan_index[mine]] = rows["probability"][mine]
                n_train[s] = np.nanmax(rows["n_train"][mine]) if np.isfinite(rows["n_train"][mine]).any() else np.nan
                for target, column in OPERATING_POINTS.items():
                    values = np.unique(rows[column][mine][np.isfinite(rows[column][mine])])
                    if len(values) > 1:
                        raise InputError(
                            f"{column} of {key[0][0]} ({key[0][1]}), {finding}, seed {seed_name}: "
                            "one fit has one threshold, these rows disagree"
                        )
                    thresholds[target][s] = values[0] if len(values) else np.nan
            self.scores[key], self.present[key], self.seeds[key] = scores, present, seeds
            self.probabilities[key], self.thresholds[key], self.n_train[key] = probabilities, thresholds, n_train

    def _not_estimable(self, scored: np.ndarray) -> str | None:
        """Why the scans of mask ``scored`` (n_scans,) bear no metric, or None."""
        return M.not_estimable_reason(int(np.sum(self.labels[scored] == 1)), int(np.sum(self.labels[scored] == 0)))

    def _seed_metrics(self, key: tuple, mask: np.ndarray) -> dict:
        """Every metric for every seed and replicate: arrays (n_seeds, 1 + n_bootstrap)."""
        per_seed = [M.detection_metrics(self.labels, s, self.weights * m) for s, m in zip(self.scores[key], mask)]
        return {name: np.stack([p[name] for p in per_seed]) for name in METRIC_NAMES}

    def _probabilities(self, key: tuple) -> tuple[np.ndarray, str]:
        """(n_seeds, n_scans) probabilities (0 where not scored) and where they come from."""
        present = self.present[key] > 0
        given = self.probabilities[key]
        if np.all(np.isfinite(given[present])):
            return np.where(present, given, 0.0), PROBABILITY_COLUMN
        return np.where(present, expit(self.scores[key]), 0.0), UNCALIBRATED

    def _identity(self, key: tuple) -> dict:
        """The columns that name a row's system, finding, label budget and site group."""
        (model, arm), (fraction, shots) = key
        return {
            "model": model,
            "arm": arm,
            "finding": self.finding,
            "label_fraction": fraction,
            "shots": shots,
            "group": self.group,
        }

    def _described(self, key: tuple) -> dict:
        _, (fraction, shots) = key
        scored = self.present[key].max(axis=0) > 0
        return {
            **self._identity(key),
            "budget": budget_name(fraction, shots),
            "sites": ";".join(self.sites),
            "n_scans": int(scored.sum()),
            "n_patients": len(set(self.patients[scored])),
            "n_pos": int((self.labels[scored] == 1).sum()),
            "n_neg": int((self.labels[scored] == 0).sum()),
            "n_seeds": len(self.seeds[key]),
        }

    def metric_rows(self, level: float) -> list[dict]:
        rows = []
        for key in sorted(self.scores, key=_key_order):
            present = self.present[key]
            note = self._not_estimable(present.max(axis=0) > 0)
            n_train = self.n_train[key]
            row = {
                **self._described(key),
                "note": note or "",
                "n_train": float(np.mean(n_train)) if np.isfinite(n_train).all() else float("nan"),
            }
            probabilities, row["probability_source"] = self._probabilities(key)
            row.update(dict.fromkeys(METRIC_VALUE_COLUMNS, float("nan")))
            if note:
                rows.append(row)
                continue
            values = self._seed_metrics(key, present)
            values["ece"] = np.stack(
                [M.expected_calibration_error(self.labels, p, self.weights * m) for p, m in zip(probabilities, present)]
            )
            for name, per_seed in values.items():
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _seed_mean_with_ci(per_seed, level)
            point = values["auroc"][:, 0]
            row["auroc_seed_sd"] = float(np.std(point, ddof=1)) if len(point) > 1 else 0.0
            rows.append(row)
        return rows

    def comparison_rows(self, level: float) -> list[dict]:
        """Per budget: every pair of systems at that budget but the ceiling, then every pretrained system at
        that budget against each ceiling system (at the ceiling's own budget, see the module docstring)."""
        rows = []
        ceilings = self._ceilings()
        budgets = sorted({budget for _, budget in self.scores}, key=_budget_order)
        for budget in budgets:
            systems = sorted(
                {system for system, b in self.scores if b == budget and system[1] != CEILING}, key=_system_order
            )
            pairs = [((a, budget), (b, budget)) for a, b in itertools.combinations(systems, 2)]
            pairs += [
                ((system, budget), ceiling) for system in systems if system[1] == "pretrained" for ceiling in ceilings
            ]
            rows += [row for key_a, key_b in pairs if (row := self._comparison_row(key_a, key_b, level))]
        return rows

    def _ceilings(self) -> list[tuple]:
        """The key of each ceiling system: its rows at its largest label fraction (finetune writes 1)."""
        budgets: dict[tuple, list] = {}
        for system, budget in self.scores:
            if system[1] == CEILING and not budget[1]:
                budgets.setdefault(system, []).append(budget)
        return [
            (system, max(budgets[system], key=lambda b: float(b[0]))) for system in sorted(budgets, key=_system_order)
        ]

    def _comparison_row(self, key_a: tuple, key_b: tuple, level: float) -> dict | None:
        """System ``a`` against ``b`` (keys (system, budget); the row names ``a``'s budget) on the scans every
        seed of both scored: seed-averaged AUROCs, their difference with its paired-bootstrap CI and p-value.
        None when they share no scan."""
        (a, budget), (b, _) = key_a, key_b
        common = self.present[key_a].min(axis=0) * self.present[key_b].min(axis=0)
        on = common > 0
        if not on.any():
            return None
        row = {
            "finding": self.finding,
            "group": self.group,
            "label_fraction": budget[0],
            "shots": budget[1],
            "budget": budget_name(*budget),
            "model_a": a[0],
            "arm_a": a[1],
            "model_b": b[0],
            "arm_b": b[1],
            "n_scans": int(on.sum()),
            "n_pos": int(np.sum(self.labels[on] == 1)),
            "n_neg": int(np.sum(self.labels[on] == 0)),
            "note": self._not_estimable(on) or "",
            "primary": _is_primary(a, b),
            **dict.fromkeys(
                ("auroc_a", "auroc_b", "auroc_diff", "auroc_diff_se", "auroc_diff_lo", "auroc_diff_hi", "p_bootstrap"),
                float("nan"),
            ),
        }
        if not row["note"]:
            auc_a, auc_b = (
                np.mean([M.auroc(self.labels, scores, self.weights * common) for scores in self.scores[key]], axis=0)
                for key in (key_a, key_b)
            )
            difference = auc_a - auc_b
            test = M.bootstrap_difference_test(float(difference[0]), difference[1:], level)
            row.update(
                {
                    "auroc_a": float(auc_a[0]),
                    "auroc_b": float(auc_b[0]),
                    "auroc_diff": float(difference[0]),
                    "auroc_diff_se": test["se"],
                    "auroc_diff_lo": test["low"],
                    "auroc_diff_hi": test["high"],
                    "p_bootstrap": test["p_value"],
                }
            )
        return row

    def operating_point_rows(self, level: float) -> list[dict]:
        """Sensitivity, specificity, PPV and NPV at each target specificity of ``OPERATING_POINTS``."""
        rows = []
        for key in sorted(self.scores, key=_key_order):
            present = self.present[key]
            note = self._not_estimable(present.max(axis=0) > 0)
            probabilities, source = self._probabilities(key)
            for target, column in OPERATING_POINTS.items():
                thresholds = self.thresholds[key][target]
                # A validation threshold is on the probability: it needs the probability column.
                validated = bool(np.isfinite(thresholds).all()) and source == PROBABILITY_COLUMN
                row = {
                    **self._described(key),
                    "target_specificity": target,
                    "note": note or "",
                    "threshold_source": THRESHOLD_ON_VALIDATION if validated else THRESHOLD_ON_TEST,
                    **dict.fromkeys(OPERATING_POINT_VALUE_COLUMNS, float("nan")),
                }
                if note:
                    rows.append(row)
                    continue
                per_seed = []
                for s, (scores, mask) in enumerate(zip(self.scores[key], present)):
                    weights = self.weights * mask
                    if validated:  # validation thresholds are on the probability
                        rates = M.operating_point(self.labels, probabilities[s], thresholds[s], weights)
                        rates["threshold"] = np.full(len(weights), thresholds[s])
                    else:
                        rates = M.operating_point_at_specificity(self.labels, scores, target, weights)
                    per_seed.append(rates)
                row["threshold"] = float(np.mean([rates["threshold"][0] for rates in per_seed]))
                for name in M.OPERATING_POINT_NAMES:
                    per_name = np.stack([rates[name] for rates in per_seed])
                    row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _seed_mean_with_ci(per_name, level)
                rows.append(row)
        return rows

    def calibration_rows(self) -> list[dict]:
        """The reliability diagram: per probability bin with scans, the mean probability and the observed
        rate of positives, pooled over seeds (``n_scans``: scans per seed in the bin)."""
        rows = []
        for key in sorted(self.scores, key=_key_order):
            present = self.present[key]
            if self._not_estimable(present.max(axis=0) > 0):
                continue
            probabilities, source = self._probabilities(key)
            binned = [M.calibration_bins(self.labels, p, m) for p, m in zip(probabilities, present)]
            counts, probability_sums, label_sums = (np.sum([b[i] for b in binned], axis=0) for i in range(3))
            for b in np.flatnonzero(counts > 0):
                rows.append(
                    {
                        **self._identity(key),
                        "probability_source": source,
                        "bin_low": b / M.CALIBRATION_BINS,
                        "bin_high": (b + 1) / M.CALIBRATION_BINS,
                        "n_scans": float(counts[b] / len(binned)),
                        "mean_probability": float(probability_sums[b] / counts[b]),
                        "observed_rate": float(label_sums[b] / counts[b]),
                    }
                )
        return rows

    def roc_rows(self) -> list[dict]:
        """ROC curves averaged vertically over seeds (mean sensitivity at each false-positive rate)."""
        rows = []
        for key in sorted(self.scores, key=_key_order):
            if self._not_estimable(self.present[key].max(axis=0) > 0):
                continue
            curves = []
            for scores, present in zip(self.scores[key], self.present[key]):
                on = present > 0
                if (self.labels[on] == 1).any() and (self.labels[on] == 0).any():
                    fpr, tpr = M.roc_curve(self.labels[on], scores[on])
                    # At each false-positive rate of the grid: the highest sensitivity a threshold reaches
                    # without exceeding that rate (tpr grows along the curve, so the last such point).
                    curves.append(tpr[np.searchsorted(fpr, ROC_GRID + 1e-12, side="right") - 1])
            if curves:
                mean_tpr = np.mean(curves, axis=0)
                for fpr_value, tpr_value in zip(ROC_GRID, mean_tpr):
                    rows.append(
                        {
                            **self._identity(key),
                            "fpr": float(fpr_value),
                            "tpr": float(tpr_value),
                        }
                    )
        return rows


def _seed_mean_with_ci(per_seed: np.ndarray, level: float) -> tuple[float, float, float]:
    """(n_seeds, 1 + n_bootstrap) values -> the seed-averaged point estimate and its bootstrap CI."""
    seed_mean = per_seed.mean(axis=0)
    return (float(seed_mean[0]), *M.percentile_interval(seed_mean[1:], level))


def _numeric_first(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _budget_order(budget: tuple[str, str]) -> tuple:
    fraction, shots = budget
    return (0, float(shots), "") if shots else (1,) + _numeric_first(fraction)[1:]


def _system_order(system: tuple[str, str]) -> tuple:
    # Pretrained arms first, then any other arm, scratch, the ceiling, the floors: differences read
    # "pretrained - scratch", "pretrained - ceiling", "pretrained - random-init", "scratch - hu-histogram".
    model, arm = system
    ranks = {"pretrained": 0, "scratch": 2, CEILING: 3, **{floor: 4 + i for i, floor in enumerate(FLOORS)}}
    return (ranks.get(arm, 1), model, arm)


def _key_order(key: tuple) -> tuple:
    system, budget = key
    return (_system_order(system), _budget_order(budget))


def _float(value) -> float:
    return float("nan") if value is None or value == "" else float(value)


# ---------------------------------------------------------------------------------------- output
_ROW_KEYS = [
    "model",
    "arm",
    "finding",
    "label_fraction",
    "shots",
    "budget",
    "group",
    "sites",
    "n_scans",
    "n_patients",
    "n_pos",
    "n_neg",
    "n_seeds",
]
METRIC_VALUE_COLUMNS = [
    *[f"{name}{suffix}" for name in (*METRIC_NAMES, "ece") for suffix in ("", "_lo", "_hi")],
    "auroc_seed_sd",
]
METRIC_COLUMNS = [*_ROW_KEYS, "n_train", "note", *METRIC_VALUE_COLUMNS, "probability_source"]
COMPARISON_COLUMNS = [
    "finding",
    "group",
    "label_fraction",
    "shots",
    "budget",
    "model_a",
    "arm_a",
    "model_b",
    "arm_b",
    "n_scans",
    "n_pos",
    "n_neg",
    "note",
    "primary",
    "auroc_a",
    "auroc_b",
    "auroc_diff",
    "auroc_diff_se",
    "auroc_diff_lo",
    "auroc_diff_hi",
    "p_bootstrap",
    "p_holm",
]
OPERATING_POINT_VALUE_COLUMNS = [
    "threshold",
    *[f"{name}{suffix}" for name in M.OPERATING_POINT_NAMES for suffix in ("", "_lo", "_hi")],
]
OPERATING_POINT_COLUMNS = [*_ROW_KEYS, "note", "target_specificity", "threshold_source", *OPERATING_POINT_VALUE_COLUMNS]
CALIBRATION_COLUMNS = [
    "model",
    "arm",
    "finding",
    "label_fraction",
    "shots",
    "group",
    "probability_source",
    "bin_low",
    "bin_high",
    "n_scans",
    "mean_probability",
    "observed_rate",
]
ROC_COLUMNS = ["model", "arm", "finding", "label_fraction", "shots", "group", "fpr", "tpr"]
FIT_COLUMNS = ["path", "model", "arm", "label_fraction", "shots", "seed", "ended_by", "steps", "best_step"]


def arm_effects(comparisons: list[dict], baseline_arm: str, same_model: bool = False) -> list[dict]:
    """Every estimable comparison of a pretrained system with a ``baseline_arm`` system (of the same model
    name when ``same_model``), turned to read pretrained - baseline: ``model, baseline_model, finding, group,
    budget, label_fraction, shots, diff, low, high, p_bootstrap, p_holm`` (AUROC difference, its
    paired-bootstrap CI and p-values; the budget is the pretrained system's)."""
    effects = []
    for c in comparisons:
        if {c["arm_a"], c["arm_b"]} != {"pretrained", baseline_arm} or (same_model and c["model_a"] != c["model_b"]):
            continue
        if not math.isfinite(_float(c.get("auroc_diff"))):  # not estimable
            continue
        pretrained_first = c["arm_a"] == "pretrained"
        sign = 1.0 if pretrained_first else -1.0
        model, baseline_model = (c["model_a"], c["model_b"]) if pretrained_first else (c["model_b"], c["model_a"])
        low, high = sorted((sign * float(c["auroc_diff_lo"]), sign * float(c["auroc_diff_hi"])))
        effects.append(
            {
                "model": model,
                "baseline_model": baseline_model,
                "finding": c["finding"],
                "group": c["group"],
                "budget": c["budget"],
                "label_fraction": c["label_fraction"],
                "shots": c["shots"],
                "diff": sign * float(c["auroc_diff"]),
                "low": low,
                "high": high,
                "p_bootstrap": float(c["p_bootstrap"]),
                "p_holm": _float(c.get("p_holm")),
            }
        )
    return effects


def pretraining_effects(comparisons: list[dict]) -> list[dict]:
    """What pretraining buys: :func:`arm_effects` of every pretrained model against its scratch twin
    (same model name)."""
    return arm_effects(comparisons, "scratch", same_model=True)


def ceiling_effects(comparisons: list[dict]) -> list[dict]:
    """How far below full supervision: :func:`arm_effects` of every pretrained system, at each of its label
    budgets, against the supervised ceiling (``CEILING``, trained on all the labels), pretrained - ceiling.
    Descriptive: ``p_holm`` is NaN (not in Holm's family)."""
    return arm_effects(comparisons, CEILING)


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike) -> None:
    """Write ``metrics.csv``, ``comparisons.csv``, ``operating_points.csv``, ``calibration.csv``, ``roc.csv``,
    ``fits.csv`` (how each fit ended) and ``metrics.json`` (everything but the ROC points) into ``out``."""
    out = Path(out)
    atomic_write_text(out / "metrics.csv", rows_to_csv(evaluation.metrics, METRIC_COLUMNS))
    atomic_write_text(out / "comparisons.csv", rows_to_csv(evaluation.comparisons, COMPARISON_COLUMNS))
    atomic_write_text(out / "operating_points.csv", rows_to_csv(evaluation.operating_points, OPERATING_POINT_COLUMNS))
    atomic_write_text(out / "calibration.csv", rows_to_csv(evaluation.calibration, CALIBRATION_COLUMNS))
    atomic_write_text(out / "roc.csv", rows_to_csv(evaluation.roc, ROC_COLUMNS))
    atomic_write_text(out / "fits.csv", rows_to_csv(evaluation.fits, FIT_COLUMNS))
    document = {
        "settings": evaluation.settings,
        "runs": evaluation.runs,
        "cohorts": evaluation.cohorts,
        "metrics": evaluation.metrics,
        "comparisons": evaluation.comparisons,
        "operating_points": evaluation.operating_points,
        "calibration": evaluation.calibration,
        "fits": evaluation.fits,
    }
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(document), indent=2))


def read_evaluation(folder: str | os.PathLike) -> Evaluation:
    """Read what :func:`write_evaluation` wrote (a folder from before operating points and calibration
    existed reads with those empty; one from before the fit endings, with them told from its runs)."""
    folder = Path(folder)
    try:
        document = json.loads((folder / "metrics.json").read_text())
        with open(folder / "roc.csv", newline="") as handle:
            roc = [{**row, "fpr": float(row["fpr"]), "tpr": float(row["tpr"])} for row in csv.DictReader(handle)]
    except (OSError, ValueError) as error:
        raise InputError(f"{folder}: not an evaluation folder ({error})") from None
    return Evaluation(
        document["metrics"],
        document["comparisons"],
        roc,
        document["runs"],
        document["settings"],
        document.get("operating_points", []),
        document.get("calibration", []),
        document.get("cohorts", []),
        document["fits"] if "fits" in document else fit_endings(document["runs"]),
    )


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
