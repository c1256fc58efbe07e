"""Pooled patch-token features: what encode returns, the feature sets of the embeddings table (old tables
included), the choice among them on validation (``auto``), and a probe that sees a finding only the max
over patch tokens carries."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fmct.errors import InputError
from fmct.eval.classifiers import choose_features
from fmct.eval.embeddings import AUTO_CANDIDATES, FEATURE_SETS, read_embeddings, write_embeddings
from fmct.eval.evaluate import read_predictions
from fmct.eval.probe import ProbeConfig, run_probe
from fmct.models import ViT3DConfig, build_vit3d
from fmct.models.classifier import pooled_features
from fmct.models.encode import FEATURES, encode, feature_names, scan_features
from test_embed import TINY, tiny_model

torch.set_num_threads(1)


def max_only_features(
    n_scans: int, seed: int = 0, n_patches: int = 64, dim: int = 16, channels: int = 4, bump: float = 6.0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features (:data:`FEATURES`, pooled by :func:`scan_features`) of scans whose finding lives only in the
    max over patch tokens, and their 0/1 labels (40 % positive).

    Tokens are N(0, 1); a positive scan has one patch raised by ``bump`` in the first ``channels`` channels
    and every patch lowered by bump / (n_patches - 1) there, so that its mean patch token is exactly what
    it would have been: the CLS and the mean carry nothing, the max carries the finding.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_scans) % 5 < 2).astype(int)
    patch = rng.normal(size=(n_scans, n_patches, dim))
    for i in np.flatnonzero(labels):
        patch[i, :, :channels] -= bump / (n_patches - 1)
        patch[i, rng.integers(n_patches), :channels] += bump + bump / (n_patches - 1)
    tokens = {"cls": torch.from_numpy(rng.normal(size=(n_scans, dim))), "patch": torch.from_numpy(patch)}
    return {name: values.numpy() for name, values in scan_features(tokens).items()}, labels


def _max_only_table(root: Path, n_scans: int = 240) -> np.ndarray:
    features, labels = max_only_features(n_scans)
    scan_ids = [f"s{i:04d}" for i in range(n_scans)]
    write_embeddings(root / "emb", scan_ids, features, meta={"model": "synthetic", "arm": "pretrained"})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scan_id", "patient_id", "ich"])
        writer.writerows([scan_id, f"p{i:04d}", labels[i]] for i, scan_id in enumerate(scan_ids))
    return labels


def _test_auroc(out: Path) -> float:
    columns = read_predictions(out).columns
    return roc_auc_score(columns["label"].astype(int), columns["score"].astype(float))


# ------------------------------------------------------------------------------------ encode
def test_encode_returns_cls_and_the_mean_and_max_patch_token():
    model = tiny_model()
    x = torch.rand(3, 3, 32, 32, 32)
    features = encode(model, x)
    assert list(features) == list(FEATURES) == ["cls", "patch_mean", "patch_max"]
    with torch.no_grad():
        tokens = model.forward_features(x)
    pooled = pooled_features(tokens)  # the one home of the pooling
    for name, key in zip(FEATURES, ("cls", "mean", "max")):
        assert features[name].dtype == torch.float32 and features[name].shape == (3, 64)
        torch.testing.assert_close(features[name], pooled[key])
    torch.testing.assert_close(features["patch_max"], tokens["patch"].max(dim=1).values)
    # Differentiable outside encode (a probe detector's saliency goes through it).
    patch = torch.zeros(1, 4, 2, requires_grad=True)
    scan_features({"cls": torch.zeros(1, 2), "patch": patch})["patch_max"].sum().backward()
    assert patch.grad.sum() == 2.0  # one patch per channel


def test_a_backbone_with_change_heads_adds_its_scan_change_logit_and_draws_the_same_blocks():
    torch.manual_seed(0)
    model = build_vit3d(ViT3DConfig(**TINY, change_heads=True)).eval()
    x = torch.rand(2, 3, 32, 32, 32)
    features = encode(model, x)
    assert list(features) == list(feature_names(model)) == ["cls", "patch_mean", "patch_max", "change"]
    with torch.no_grad():
        expected = features["cls"] @ model.change_head.scan.weight.T + model.change_head.scan.bias
    assert features["change"].shape == (2, 1)
    torch.testing.assert_close(features["change"], expected)
    # The heads are drawn after the backbone: the same seed gives the same backbone with or without them.
    plain = tiny_model(0)
    assert feature_names(plain) == FEATURES
    torch.testing.assert_close(encode(plain, x)["cls"], features["cls"])


def test_max_only_features_carry_the_finding_in_the_max_alone():
    features, labels = max_only_features(400)
    for name, expected in (("cls", False), ("patch_mean", False), ("patch_max", True)):
        best = max(max(auc, 1 - auc) for auc in (roc_auc_score(labels, column) for column in features[name].T))
        assert (best > 0.95) if expected else (best < 0.65), (name, best)


# ---------------------------------------------------------------------------- feature sets
def test_feature_sets_concatenate_in_a_fixed_order_and_old_tables_still_load(tmp_path):
    cls, mean, top = np.eye(3)[:2], np.ones((2, 2)), np.full((2, 1), 7.0)
    write_embeddings(
        tmp_path / "new", ["a", "b"], {"cls": cls, "patch_mean": mean, "patch_max": top}, {"default_feature": "auto"}
    )
    new = read_embeddings(tmp_path / "new")
    np.testing.assert_array_equal(new.feature_matrix("cls_mean_max"), np.hstack([cls, mean, top]))
    np.testing.assert_array_equal(new.feature_matrix("concat"), np.hstack([cls, mean]))
    np.testing.assert_array_equal(new.feature_matrix("patch_max"), top)
    candidates, note = new.candidates("auto")
    # A backbone without change heads: auto leaves out the change logit without a note.
    assert list(candidates) == ["cls", "concat", "cls_mean_max"] and note == ""
    assert new.default_feature == "auto"
    assert set(FEATURE_SETS) == {"cls", "patch_mean", "patch_max", "concat", "cls_mean_max", "change"}
    change = np.array([[0.5], [-2.0]])
    write_embeddings(
        tmp_path / "heads", ["a", "b"], {"cls": cls, "patch_mean": mean, "patch_max": top, "change": change}
    )
    candidates, note = read_embeddings(tmp_path / "heads").candidates("auto")
    assert list(candidates) == list(AUTO_CANDIDATES) == ["change", "cls", "concat", "cls_mean_max"] and note == ""
    np.testing.assert_array_equal(candidates["change"], change)

    # A table embedded before patch_max: it loads, auto chooses among what it holds, its default stays its own.
    write_embeddings(tmp_path / "old", ["a", "b"], {"cls": cls, "patch_mean": mean}, {"default_feature": "cls"})
    old = read_embeddings(tmp_path / "old")
    assert old.default_feature == "cls"
    candidates, note = old.candidates("auto")
    assert list(candidates) == ["cls", "concat"] and "left out cls_mean_max" in note and "patch_max" in note
    with pytest.raises(InputError, match="no feature 'patch_max' .*embed again"):
        old.feature_matrix("cls_mean_max")

    write_embeddings(tmp_path / "hu", ["a", "b"], {"first_order": mean}, {"default_feature": "first_order"})
    histogram = read_embeddings(tmp_path / "hu")
    assert list(histogram.candidates("first_order")[0]) == ["first_order"]
    with pytest.raises(InputError, match="none of a backbone's features"):
        histogram.candidates("auto")


# ------------------------------------------------------------------------------ the choice
def test_choose_features_keeps_the_best_mean_validation_auroc_and_the_earlier_on_a_tie():
    val = {"a": [0.6, math.nan], "b": [0.8, 0.6], "c": [0.7, 0.7]}  # means 0.6, 0.7, 0.7
    names = list(val)
    candidates = {name: np.full((1, 1), i) for i, name in enumerate(names)}  # x says which candidate is fitted

    def fit(x: np.ndarray) -> list[tuple[str, float]]:
        name = names[int(x[0, 0])]
        return [(name, auc) for auc in val[name]]

    choice = choose_features(candidates, fit, lambda one: one[1])
    assert choice.name == "b" and choice.chosen_on == "val" and [fit[0] for fit in choice.fits] == ["b", "b"]
    assert choice.val_auroc == pytest.approx({"a": 0.6, "b": 0.7, "c": 0.7})
    assert choice.record() == {"features": "b", "features_val_auroc": choice.val_auroc, "features_chosen_on": "val"}

    unscored = choose_features(
        candidates, lambda x: [math.nan], lambda auc: auc
    )  # no validation split with both classes
    assert unscored.name == "a" and unscored.chosen_on == "default"
    late = choose_features(candidates, lambda x: [math.nan if x[0, 0] < 2 else 0.4], lambda auc: auc)
    assert late.name == "c" and late.chosen_on == "val"  # a scored candidate beats unscored ones, whatever its AUROC


def test_auto_finds_a_finding_only_the_max_pooled_feature_carries(tmp_path):
    labels = _max_only_table(tmp_path)
    config = ProbeConfig(label_fractions=(0.5, 1.0), seeds=2)
    run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), tmp_path / "auto", config)  # the table's default: auto
    run = read_predictions(tmp_path / "auto").run
    assert run["features"] == "auto" and len(run["fits"]) == 4
    for fit in run["fits"]:
        assert fit["features"] == "cls_mean_max" and fit["features_chosen_on"] == "val"
        # (cls's validation AUROC sits above 0.5: it is the best of the C grid on noise, chosen on those scans.)
        assert fit["features_val_auroc"]["cls_mean_max"] > 0.9 > fit["features_val_auroc"]["cls"]
        assert fit["val_auroc"] == fit["features_val_auroc"]["cls_mean_max"]
    assert _test_auroc(tmp_path / "auto") > 0.9

    for features, low, high in (("cls", 0.3, 0.7), ("concat", 0.3, 0.7), ("patch_max", 0.9, 1.0)):
        run_probe(
            tmp_path / "emb",
            str(tmp_path / "labels.csv"),
            tmp_path / features,
            ProbeConfig(label_fractions=(1.0,), seeds=1, features=features),
        )
        assert low < _test_auroc(tmp_path / features) <= high, features
        assert {fit["features"] for fit in read_predictions(tmp_path / features).run["fits"]} == {features}
    assert np.mean(labels) == pytest.approx(0.4)


def test_auto_chooses_on_validation_only_never_on_the_evaluated_scans(tmp_path):
    _max_only_table(tmp_path)
    config = ProbeConfig(label_fractions=(1.0,), seeds=1)
    run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), tmp_path / "first", config)
    evaluated = set(read_predictions(tmp_path / "first").columns["scan_id"])
    # Scramble every feature of the evaluated (test) scans: the choice and its validation figures must not move.
    table = read_embeddings(tmp_path / "emb")
    rows = np.isin(table.scan_ids, list(evaluated))
    rng = np.random.default_rng(1)
    scrambled = {
        name: np.where(rows[:, None], rng.normal(size=values.shape), values) for name, values in table.features.items()
    }
    write_embeddings(tmp_path / "emb", table.scan_ids, scrambled, table.meta)
    run_probe(tmp_path / "emb", str(tmp_path / "labels.csv"), tmp_path / "second", config)
    first, second = (json.loads((tmp_path / name / "run.json").read_text())["fits"] for name in ("first", "second"))
    assert [(f["features"], f["features_val_auroc"], f["C"]) for f in first] == [
        (f["features"], f["features_val_auroc"], f["C"]) for f in second
    ]
    assert _test_auroc(tmp_path / "second") < 0.7  # the test scans did change
