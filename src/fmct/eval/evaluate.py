"""Predictions in, metrics with patient-level bootstrap CIs and paired comparisons out (``fmct evaluate``).

The predictions format (the contract between ``probe``/``finetune`` and ``evaluate``/``report``)
---------------------------------------------------------------------------------------------------
A predictions folder holds:

- ``predictions.csv``, one row per scan x finding x label budget x seed, columns ``PREDICTION_COLUMNS``:
  ``scan_id``; ``patient_id`` (may be empty: the scan is then its own patient); ``site``;
  ``split``: ``test`` (in-distribution test) or ``ood`` (test scan of a held-out site), other splits
  (train, val) may be present and are ignored; ``finding``; ``label`` 0/1; ``score`` (higher = more
  likely positive); ``model`` (a name); ``arm`` (``pretrained``; ``scratch``: the same architecture trained
  from a random init; the floors ``random-init`` and ``hu-histogram`` of ``FLOORS``); ``label_fraction`` (share
  of the training labels used, e.g. 0.01); ``seed`` (of the training subset and fit); and the optional
  ``shots`` (N positives and N negatives trained on; ``label_fraction`` is then empty).
- ``run.json``: the config and model identity behind the scores (embeddings or checkpoint path and its
  sha256, method, splits...). ``evaluate`` and ``report`` copy it next to every number.

Averaging over seeds
--------------------
Each seed is one training subset and fit, i.e. one model a user could have trained; the quantity of
interest is the metric a user can expect, not that of an ensemble of seeds. So every metric is computed
per seed and then averaged over seeds, and its 95% CI comes from a patient-level bootstrap of that
seed-averaged metric: each replicate resamples patients (all their scans together), recomputes the
metric of every seed on that resample, and averages. The spread over seeds alone is reported as
``auroc_seed_sd``. The same resampled patients serve every model and arm of a finding and site group,
which makes the paired comparisons paired.

Paired comparisons
------------------
For every finding, budget and site group, each pair of (model, arm) systems is compared on the scans
both scored: the AUROC difference (a - b) with its paired-bootstrap 95% CI and two-sided bootstrap
p-value (2 x (replicates on the far side of 0, plus 1) / (resamples + 1)), and DeLong's paired test on
the scores averaged over seeds (exact for one seed; scans treated as independent, unlike the bootstrap,
which keeps patients together). :func:`arm_effects` reads them as pretrained - baseline: against the
scratch twin (:func:`pretraining_effects`: what pretraining buys) and against each floor of ``FLOORS``
(a pretrained arm clears a floor where the difference's CI lies above 0).
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

from fmct.eval import metrics as M
from fmct.atomic import atomic_write_text
from fmct.tables import rows_to_csv
from fmct.errors import InputError

PREDICTION_COLUMNS = [
    "scan_id", "patient_id", "site", "split", "finding", "label", "score",
    "model", "arm", "label_fraction", "seed", "shots",
]
METRIC_NAMES = ("auroc", "auprc", "sens_at_spec90", "sens_at_spec95")
GROUPS = {"test": "ID", "ood": "OOD"}  # split -> site group
# The floors every pretrained arm must beat (arm -> what it is), each probed like the pretrained backbone.
FLOORS = {
    "random-init": "the same architecture, randomly initialised and frozen",
    "hu-histogram": "first-order HU histogram and statistics of each scan",
}
ROC_GRID = np.linspace(0.0, 1.0, 101)


# ----------------------------------------------------------------------------------- the format
def write_predictions(folder: str | os.PathLike, rows: list[dict], run: dict) -> None:
    """Write ``predictions.csv`` (columns ``PREDICTION_COLUMNS``) and ``run.json`` into ``folder``, atomically."""
    folder = Path(folder)
    atomic_write_text(folder / "run.json", json.dumps(run, indent=2, sort_keys=True, default=str))
    atomic_write_text(folder / "predictions.csv", rows_to_csv(rows, PREDICTION_COLUMNS))


@dataclass
class Predictions:
    """One predictions folder: its rows as columns of arrays, and its run.json."""

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
        columns["label"] = columns["label"].astype(float)
        columns["score"] = columns["score"].astype(float)
    except ValueError as error:
        raise InputError(f"{csv_path}: label and score must be numbers ({error})") from None
    if not np.all(np.isin(columns["label"], (0.0, 1.0))):
        raise InputError(f"{csv_path}: label must be 0 or 1")
    if not np.all(np.isfinite(columns["score"])):
        raise InputError(f"{csv_path}: score must be finite")
    run_path = folder / "run.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    return Predictions(path=folder, columns=columns, run=run)


def budget_name(label_fraction: str, shots: str) -> str:
    """How a label budget is shown: ``0.1`` for a label fraction, ``16 shots`` for N shots."""
    return f"{shots} shots" if shots else label_fraction


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    metrics: list[dict]
    comparisons: list[dict]
    roc: list[dict]
    runs: list[dict]
    settings: dict


def evaluate(
    folders: list[str | os.PathLike], n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> Evaluation:
    """Metrics per (model, arm, finding, budget, site group) with CIs, and paired comparisons.

    Only rows of split ``test`` (group ID) and ``ood`` (group OOD) count. See the module docstring for
    how seeds are averaged and how pairs are compared.
    """
    loaded = [read_predictions(f) for f in folders]
    table = {c: np.concatenate([p.columns[c] for p in loaded]) for c in PREDICTION_COLUMNS}
    keep = np.isin(table["split"], list(GROUPS))
    table = {c: v[keep] for c, v in table.items()}
    if not keep.any():
        raise InputError("no prediction has split test or ood: nothing to evaluate")
    table["group"] = np.array([GROUPS[s] for s in table["split"]])
    table["patient"] = np.where(table["patient_id"] != "", table["patient_id"], table["scan_id"])
    settings = {"n_bootstrap": n_bootstrap, "seed": seed, "level": level}

    metric_rows, comparison_rows, roc_rows = [], [], []
    for finding in sorted(set(table["finding"])):
        for group in ("ID", "OOD"):
            part = (table["finding"] == finding) & (table["group"] == group)
            if part.any():
                cell = _Cell({c: v[part] for c, v in table.items()}, finding, group, n_bootstrap, seed)
                metric_rows += cell.metric_rows(level)
                comparison_rows += cell.comparison_rows(level)
                roc_rows += cell.roc_rows()
    runs = [{"path": str(p.path), "run": p.run} for p in loaded]
    return Evaluation(metric_rows, comparison_rows, roc_rows, runs, settings)


class _Cell:
    """All predictions of one finding and site group, aligned on one list of scans.

    ``scores[system, budget]`` is an (n_seeds, n_scans) array with a matching 0/1 ``present`` mask: a scan a
    system did not score weighs 0, so every system shares the scan axis and the bootstrap weights.
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
        self.weights = np.vstack([
            np.ones((1, len(self.scan_ids))),
            M.patient_bootstrap_weights(self.patients, n_bootstrap, seed=np.random.SeedSequence(cell_seed).generate_state(1)[0]),
        ])

        self.scores: dict[tuple, np.ndarray] = {}
        self.present: dict[tuple, np.ndarray] = {}
        self.seeds: dict[tuple, list[str]] = {}
        keys = zip(rows["model"], rows["arm"], rows["label_fraction"], rows["shots"])
        groups: dict[tuple, list[int]] = {}
        for i, (model, arm, fraction, shots) in enumerate(keys):
            groups.setdefault(((model, arm), (fraction, shots)), []).append(i)
        for key, members in groups.items():
            members = np.asarray(members)
            seeds = sorted(set(rows["seed"][members]), key=_numeric_first)
            scores = np.zeros((len(seeds), len(self.scan_ids)))
            present = np.zeros((len(seeds), len(self.scan_ids)))
            for s, seed_name in enumerate(seeds):
                mine = members[rows["seed"][members] == seed_name]
                scores[s, scan_index[mine]] = rows["score"][mine]
                present[s, scan_index[mine]] = 1.0
            self.scores[key], self.present[key], self.seeds[key] = scores, present, seeds

    def _seed_metrics(self, key: tuple, mask: np.ndarray) -> dict:
        """Every metric for every seed and replicate: arrays (n_seeds, 1 + n_bootstrap)."""
        per_seed = [M.detection_metrics(self.labels, s, self.weights * m) for s, m in zip(self.scores[key], mask)]
        return {name: np.stack([p[name] for p in per_seed]) for name in METRIC_NAMES}

    def metric_rows(self, level: float) -> list[dict]:
        rows = []
        for key in sorted(self.scores, key=_key_order):
            (model, arm), (fraction, shots) = key
            present = self.present[key]
            values = self._seed_metrics(key, present)
            scored = present.max(axis=0) > 0
            row = {
                "model": model, "arm": arm, "finding": self.finding, "label_fraction": fraction, "shots": shots,
                "budget": budget_name(fraction, shots), "group": self.group, "sites": ";".join(self.sites),
                "n_scans": int(scored.sum()), "n_patients": len(set(self.patients[scored])),
                "n_pos": int((self.labels[scored] == 1).sum()), "n_neg": int((self.labels[scored] == 0).sum()),
                "n_seeds": len(self.seeds[key]),
            }
            for name in METRIC_NAMES:
                seed_mean = values[name].mean(axis=0)  # (1 + n_bootstrap,)
                row[name] = float(seed_mean[0])
                row[f"{name}_lo"], row[f"{name}_hi"] = M.percentile_interval(seed_mean[1:], level)
            point = values["auroc"][:, 0]
            row["auroc_seed_sd"] = float(np.std(point, ddof=1)) if len(point) > 1 else 0.0
            rows.append(row)
        return rows

    def comparison_rows(self, level: float) -> list[dict]:
        rows = []
        budgets = sorted({budget for _, budget in self.scores}, key=_budget_order)
        for budget in budgets:
            systems = sorted({system for system, b in self.scores if b == budget}, key=_system_order)
            for a, b in itertools.combinations(systems, 2):
                key_a, key_b = (a, budget), (b, budget)
                # Scans scored by every seed of both systems.
                common = (self.present[key_a].min(axis=0) * self.present[key_b].min(axis=0))[None, :]
                if not ((self.labels[common[0] > 0] == 1).any() and (self.labels[common[0] > 0] == 0).any()):
                    continue
                auc_a, auc_b = (
                    np.mean([M.auroc(self.labels, scores, self.weights * common) for scores in self.scores[key]], axis=0)
                    for key in (key_a, key_b)
                )
                difference = auc_a - auc_b
                replicates = difference[1:][np.isfinite(difference[1:])]
                # Two-sided, counting the observed sample as one replicate, so p is never 0 (at least 2 / (R + 1)).
                tail = min(np.sum(replicates <= 0), np.sum(replicates >= 0)) + 1
                p_bootstrap = min(1.0, 2.0 * tail / (replicates.size + 1)) if replicates.size else float("nan")
                on = common[0] > 0
                try:
                    test = M.delong_test(
                        self.labels[on], self.scores[key_a][:, on].mean(axis=0), self.scores[key_b][:, on].mean(axis=0)
                    )
                    p_delong = test["p_value"]
                except ValueError:  # fewer than two scans of a class: no DeLong variance
                    p_delong = float("nan")
                low, high = M.percentile_interval(difference[1:], level)
                rows.append({
                    "finding": self.finding, "group": self.group, "label_fraction": budget[0], "shots": budget[1],
                    "budget": budget_name(*budget), "model_a": a[0], "arm_a": a[1], "model_b": b[0], "arm_b": b[1],
                    "n_scans": int(on.sum()), "auroc_a": float(auc_a[0]), "auroc_b": float(auc_b[0]),
                    "auroc_diff": float(difference[0]), "auroc_diff_lo": low, "auroc_diff_hi": high,
                    "p_bootstrap": float(p_bootstrap), "p_delong": p_delong,
                })
        return rows

    def roc_rows(self) -> list[dict]:
        """ROC curves averaged vertically over seeds (mean sensitivity at each false-positive rate)."""
        rows = []
        for key in sorted(self.scores, key=_key_order):
            (model, arm), (fraction, shots) = key
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
                    rows.append({
                        "model": model, "arm": arm, "finding": self.finding, "label_fraction": fraction,
                        "shots": shots, "group": self.group, "fpr": float(fpr_value), "tpr": float(tpr_value),
                    })
        return rows


def _numeric_first(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _budget_order(budget: tuple[str, str]) -> tuple:
    fraction, shots = budget
    return (0, float(shots), "") if shots else (1,) + _numeric_first(fraction)[1:]


def _system_order(system: tuple[str, str]) -> tuple:
    # Pretrained arms first, then any other arm, scratch, the floors: differences read "pretrained - scratch",
    # "pretrained - random-init", "scratch - hu-histogram".
    model, arm = system
    ranks = {"pretrained": 0, "scratch": 2, **{floor: 3 + i for i, floor in enumerate(FLOORS)}}
    return (ranks.get(arm, 1), model, arm)


def _key_order(key: tuple) -> tuple:
    system, budget = key
    return (_system_order(system), _budget_order(budget))


# ---------------------------------------------------------------------------------------- output
METRIC_COLUMNS = [
    "model", "arm", "finding", "label_fraction", "shots", "budget", "group", "sites", "n_scans", "n_patients",
    "n_pos", "n_neg", "n_seeds",
    *[f"{name}{suffix}" for name in METRIC_NAMES for suffix in ("", "_lo", "_hi")],
    "auroc_seed_sd",
]
COMPARISON_COLUMNS = [
    "finding", "group", "label_fraction", "shots", "budget", "model_a", "arm_a", "model_b", "arm_b", "n_scans",
    "auroc_a", "auroc_b", "auroc_diff", "auroc_diff_lo", "auroc_diff_hi", "p_bootstrap", "p_delong",
]
ROC_COLUMNS = ["model", "arm", "finding", "label_fraction", "shots", "group", "fpr", "tpr"]


def arm_effects(comparisons: list[dict], baseline_arm: str, same_model: bool = False) -> list[dict]:
    """Every comparison of a pretrained system with a ``baseline_arm`` system (of the same model name when
    ``same_model``), turned to read pretrained - baseline: ``model, baseline_model, finding, group, budget,
    label_fraction, diff, low, high, p_bootstrap`` (AUROC difference and its paired-bootstrap CI)."""
    effects = []
    for c in comparisons:
        if {c["arm_a"], c["arm_b"]} != {"pretrained", baseline_arm} or (same_model and c["model_a"] != c["model_b"]):
            continue
        pretrained_first = c["arm_a"] == "pretrained"
        sign = 1.0 if pretrained_first else -1.0
        model, baseline_model = (c["model_a"], c["model_b"]) if pretrained_first else (c["model_b"], c["model_a"])
        low, high = sorted((sign * float(c["auroc_diff_lo"]), sign * float(c["auroc_diff_hi"])))
        effects.append({
            "model": model, "baseline_model": baseline_model, "finding": c["finding"], "group": c["group"],
            "budget": c["budget"], "label_fraction": c["label_fraction"], "diff": sign * float(c["auroc_diff"]),
            "low": low, "high": high, "p_bootstrap": float(c["p_bootstrap"]),
        })
    return effects


def pretraining_effects(comparisons: list[dict]) -> list[dict]:
    """What pretraining buys: :func:`arm_effects` of every pretrained model against its scratch twin (same model name)."""
    return arm_effects(comparisons, "scratch", same_model=True)


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike) -> None:
    """Write ``metrics.csv``, ``comparisons.csv``, ``roc.csv`` and ``metrics.json`` (everything) into ``out``."""
    out = Path(out)
    atomic_write_text(out / "metrics.csv", rows_to_csv(evaluation.metrics, METRIC_COLUMNS))
    atomic_write_text(out / "comparisons.csv", rows_to_csv(evaluation.comparisons, COMPARISON_COLUMNS))
    atomic_write_text(out / "roc.csv", rows_to_csv(evaluation.roc, ROC_COLUMNS))
    document = {
        "settings": evaluation.settings,
        "runs": evaluation.runs,
        "metrics": evaluation.metrics,
        "comparisons": evaluation.comparisons,
    }
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(document), indent=2))


def read_evaluation(folder: str | os.PathLike) -> Evaluation:
    """Read what :func:`write_evaluation` wrote."""
    folder = Path(folder)
    try:
        document = json.loads((folder / "metrics.json").read_text())
        with open(folder / "roc.csv", newline="") as handle:
            roc = [
                {**row, "fpr": float(row["fpr"]), "tpr": float(row["tpr"])} for row in csv.DictReader(handle)
            ]
    except (OSError, ValueError) as error:
        raise InputError(f"{folder}: not an evaluation folder ({error})") from None
    return Evaluation(document["metrics"], document["comparisons"], roc, document["runs"], document["settings"])


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
