"""Pretraining's online evaluation reads the features fmct embed writes and runs fmct probe's default
probe: the feature set chosen by ``auto`` on a validation split that never holds a scored scan."""

from __future__ import annotations

import numpy as np
import torch

from fmct import hub
from fmct.eval.embed import EmbedConfig, embed_store
from fmct.eval.embeddings import Embeddings, read_embeddings
from fmct.models.encode import FEATURES
from fmct.ssl.online_eval import OnlineEvaluator
from test_embed import WINDOWS, save_tiny_run, write_blob_store
from test_pooled_features import max_only_features

torch.set_num_threads(1)


def _evaluator(store, labels) -> OnlineEvaluator:
    return OnlineEvaluator(
        store,
        str(labels),
        ["ich"],
        max_scans=256,
        knn_k=5,
        excluded_sites=(),
        windows=[tuple(w) for w in WINDOWS],
        device=torch.device("cpu"),
        batch_size=7,
    )


def test_online_features_are_the_embed_tables(tmp_path):
    store, _ = write_blob_store(tmp_path, n_scans=24, seed=2)
    run = save_tiny_run(tmp_path / "run")
    evaluator = _evaluator(store, tmp_path / "labels.csv")
    backbone = hub.load(run / "backbone").train()
    features = evaluator.features(backbone)
    assert backbone.training  # its mode is given back
    embed_store(run, store, tmp_path / "emb", EmbedConfig(batch_size=5), progress=False)
    table = read_embeddings(tmp_path / "emb")
    assert list(features.features) == list(FEATURES) and list(features.scan_ids) == list(table.scan_ids)
    for name in FEATURES:
        np.testing.assert_allclose(features.features[name], table.features[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_online_linear_probe_finds_a_finding_only_the_max_pooled_feature_carries(tmp_path):
    store, _ = write_blob_store(tmp_path, n_scans=90, size=16, seed=4)  # scans to hold; their features are made below
    features, labels = max_only_features(90, seed=6)
    (tmp_path / "labels.csv").write_text(
        "scan_id,patient_id,ich\n" + "".join(f"s{i:03d},p{i // 2:03d},{label}\n" for i, label in enumerate(labels))
    )
    evaluator = _evaluator(store, tmp_path / "labels.csv")
    # The linear probe's validation split: a third of the fitting half, whole patients, never a scored scan.
    fitting, scored = evaluator.half == "train", evaluator.half == "val"
    assert 40 <= scored.sum() <= 50 and not (evaluator.choose & scored).any()
    assert 12 <= (evaluator.choose & fitting).sum() <= 18
    assert evaluator.scored == [(0, "ich")]
    patient_choose = {}
    for scan_id, chosen in zip(evaluator.scan_ids, evaluator.choose):
        assert patient_choose.setdefault(int(scan_id[1:]) // 2, chosen) == chosen  # by patient

    metrics = evaluator.evaluate(Embeddings(np.asarray(evaluator.scan_ids), features))
    assert metrics["online_linear_auroc_ich"] > 0.9, metrics  # cls | patch_mean | patch_max, chosen on validation
    assert 0.3 < metrics["online_knn_auroc_ich"] < 0.7, metrics  # k-NN on the CLS token alone: chance
    assert 1.0 < metrics["online_rankme"] <= 16
