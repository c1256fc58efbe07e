"""The classifiers that probe frozen features: logistic regression and cosine k-NN, each with its
hyperparameter chosen on a validation split by AUROC, and the choice among feature sets
(:func:`choose_features`). Used by ``fmct probe`` and by pretraining's online evaluation alike.

Features are (N, C) float arrays, labels (N,) 0/1 arrays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, TypeVar

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fmct.eval.metrics import auroc

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the logistic probe's inverse regularisations to choose among


@dataclass
class LogisticProbe:
    """A fitted L2 logistic regression on standardised features: score = ((x - mean) / scale) @ coef + intercept.

    ``mean`` and ``scale`` (C,) are the training features' standardisation (a constant feature has
    scale 1), ``coef`` (C,) and ``intercept`` the model on the standardised features; ``info`` records
    how C was chosen: ``{"C", "val_auroc", "chosen_on"}``.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    info: dict

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Scores (log-odds) of features (N, C)."""
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept


def fit_logistic_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    c_grid: tuple[float, ...],
) -> LogisticProbe:
    """Logistic regression with C chosen by validation AUROC over ``c_grid`` (the smaller C wins a tie;
    C = 1 when the validation split lacks a class). Features are (N, C) arrays, labels (N,) 0/1."""
    choose = len(set(y_val.tolist())) == 2  # AUROC on validation needs both classes there
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train)
    x_val = scaler.transform(x_val) if choose else x_val
    best = None
    for c in c_grid if choose else [1.0]:
        with warnings.catch_warnings():
            # Few samples at a large C may stop short of convergence; the validation AUROC judges the fit anyway.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        val_auc = float(auroc(y_val, model.decision_function(x_val))) if choose else float("nan")
        if best is None or val_auc > best[0]:
            best = (val_auc, c, model)
    val_auc, c, model = best
    return LogisticProbe(
        scaler.mean_.copy(),
        scaler.scale_.copy(),
        model.coef_[0].copy(),
        float(model.intercept_[0]),
        {"C": c, "val_auroc": val_auc, "chosen_on": "val" if choose else "default"},
    )


def _knn_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_query: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    k = min(k, len(x_train))
    similarity = x_query @ x_train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weight = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    return (weight * y_train[nearest]).sum(axis=1) / weight.sum(axis=1)


def fit_knn(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_eval: np.ndarray,
    ks: tuple[int, ...],
    temperature: float,
) -> tuple[np.ndarray, dict]:
    """Scores in [0, 1] of ``x_eval`` from cosine k-NN over the training scans, k chosen by validation AUROC.

    Features are (N, C) arrays, labels (N,) 0/1. Returns the scores and ``{"k", "val_auroc", "chosen_on"}``.
    """

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    x_train, x_val, x_eval = unit(x_train), unit(x_val), unit(x_eval)
    y_train = y_train.astype(np.float64)
    choose = len(set(y_val.tolist())) == 2  # AUROC on validation needs both classes there
    candidates = sorted({min(k, len(x_train)) for k in ks})
    best = None
    for k in candidates if choose else candidates[:1]:
        val_auc = float(auroc(y_val, _knn_scores(x_train, y_train, x_val, k, temperature))) if choose else float("nan")
        if best is None or val_auc > best[0]:
            best = (val_auc, k)
    val_auc, k = best
    return _knn_scores(x_train, y_train, x_eval, k, temperature), {
        "k": k,
        "val_auroc": val_auc,
        "chosen_on": "val" if choose else "default",
    }


Fit = TypeVar("Fit")


@dataclass
class FeatureChoice(Generic[Fit]):
    """The feature set :func:`choose_features` kept: its ``name``, its ``fits`` (one per task, as the caller's
    ``fit`` returned them), the mean validation AUROC of every candidate tried (``val_auroc``, NaN where no
    fit of it could be scored on validation) and ``chosen_on``: ``val``, or ``default`` when no candidate
    could be scored (the first candidate is kept)."""

    name: str
    fits: list[Fit]
    val_auroc: dict[str, float]
    chosen_on: str

    def record(self) -> dict:
        """The choice as run.json and a detector's provenance record it."""
        return {"features": self.name, "features_val_auroc": self.val_auroc, "features_chosen_on": self.chosen_on}


def choose_features(
    candidates: Mapping[str, np.ndarray],
    fit: Callable[[np.ndarray], list[Fit]],
    val_auroc: Callable[[Fit], float],
) -> FeatureChoice[Fit]:
    """Fit every candidate feature set and keep the one whose fits score best on validation.

    ``candidates``: {name: (N, C) features of every scan}, in order of preference (a tie keeps the earlier);
    ``fit(x)``: the fits of one candidate's features ``x``, one per task (e.g. per finding), each choosing
    its own hyperparameter on the validation split; ``val_auroc(f)``: the validation AUROC of fit ``f``
    (NaN when its validation split lacks a class). A candidate's score is the mean validation AUROC of its
    fits that could be scored. Nothing but the validation split decides: the evaluated scans are never seen.
    """
    best, scores = None, {}
    for name, x in candidates.items():
        fits = fit(x)
        scored = [val_auroc(f) for f in fits if math.isfinite(val_auroc(f))]
        scores[name] = float(np.mean(scored)) if scored else float("nan")
        # Strictly better wins (a tie keeps the earlier); a scored candidate beats an unscored one.
        if best is None or scores[name] > scores[best[0]] or (scored and math.isnan(scores[best[0]])):
            best = (name, fits)
    name, fits = best
    return FeatureChoice(name, fits, scores, "val" if math.isfinite(scores[name]) else "default")
