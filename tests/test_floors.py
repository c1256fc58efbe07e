"""The floors of every evaluation, through the CLI on a small store: a random-init backbone like the pretrained
one and the HU histogram, each embedded and probed like the pretrained backbone, then the report's verdict."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fmct import hub
from fmct.cli import main
from fmct.eval.embeddings import read_embeddings
from fmct.eval.evaluate import read_predictions
from fmct.eval.radiomics import FEATURE_COLUMNS, first_order_features
from fmct.models.windows import model_input
from fmct.store import Store
from test_embed import WINDOWS, save_tiny_run, write_blob_store

torch.set_num_threads(1)

# Explicit splits: 24 train, 8 val, 12 test (6 positive, 6 negative: enough for an estimable AUROC).
SPLITS = ["train"] * 24 + ["val"] * 8 + ["test"] * 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A blob store of 44 scans and a "pretrained" tiny run (seeded 5, so unlike the random init of seed 0), each
    arm embedded and probed alike through the CLI: the run (emb, probe), the random-init floor like it
    (emb_random, probe_random), the HU histogram floor (emb_hu, probe_hu). Returns (root, store, run)."""
    root = tmp_path_factory.mktemp("floors")
    store, _ = write_blob_store(root, n_scans=44, seed=3, splits=SPLITS)
    run = save_tiny_run(root / "run", seed=5)
    arms = {
        "": ["--model", str(run)],
        "_random": ["--model", "scratch", "--like", str(run)],
        "_hu": ["--model", "hu-histogram"],
    }
    for suffix, model in arms.items():
        embeddings = str(root / f"emb{suffix}")
        assert main(["embed", *model, "--store", str(store), "--out", embeddings, "--batch-size", "8"]) == 0
        assert (
            main(
                [
                    "probe",
                    "--embeddings",
                    embeddings,
                    "--labels",
                    str(root / "labels.csv"),
                    "--store",
                    str(store),
                    "--out",
                    str(root / f"probe{suffix}"),
                    "--label-fractions",
                    "0.5,1",
                    "--seeds",
                    "2",
                ]
            )
            == 0
        )
    return root, store, run


def _hu(store, scan_ids) -> torch.Tensor:
    return torch.stack([torch.from_numpy(Store(store).read(s))[None] for s in scan_ids])


def test_random_init_floor_is_the_like_architecture_with_seeded_random_weights(cohort, tmp_path, capsys):
    root, store, run = cohort
    embeddings = read_embeddings(root / "emb_random")
    meta = embeddings.meta
    assert meta["arm"] == "random-init" and meta["model"] == "run" and meta["init_seed"] == 0
    # Paths relative to the embeddings folder: the table holds no machine path.
    assert (
        (root / "emb_random" / meta["like"]).resolve() == (run / "backbone").resolve()
        and meta["model_path"] == ""
        and meta["windows_hu"] == WINDOWS
    )

    model = hub.random_init(hub.read_architecture(run / "backbone"), seed=0)
    with torch.no_grad():
        tokens = model.forward_features(model_input(_hu(store, ["s000", "s017"]), 32, WINDOWS))
        pretrained = hub.load(run / "backbone").forward_features(model_input(_hu(store, ["s000"]), 32, WINDOWS))
    np.testing.assert_allclose(embeddings.features["cls"][[0, 17]], tokens["cls"].numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(embeddings.features["cls"][0] - pretrained["cls"][0].numpy()).max() > 1e-2  # not the run's weights

    columns = read_predictions(root / "probe_random").columns
    assert set(columns["arm"]) == {"random-init"} and set(columns["model"]) == {"run"}
    reference = read_predictions(root / "probe").columns  # the same test scans as the pretrained probe's
    assert sorted(columns["scan_id"]) == sorted(reference["scan_id"])

    # A re-run reuses the chunk; another init seed makes other weights, so the chunk is recomputed.
    argv = ["embed", "--model", "scratch", "--like", str(run), "--store", str(store), "--out", str(tmp_path / "emb")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0 and "(1 of 1 chunks reused)" in capsys.readouterr().out
    assert main([*argv, "init_seed=1"]) == 0 and "(0 of 1 chunks reused)" in capsys.readouterr().out
    assert read_embeddings(tmp_path / "emb").meta["init_seed"] == 1


def test_hu_histogram_floor_is_probed_like_any_embeddings(cohort):
    root, store, _ = cohort
    embeddings = read_embeddings(root / "emb_hu")
    assert list(embeddings.features) == ["first_order"] and embeddings.features["first_order"].shape == (
        44,
        len(FEATURE_COLUMNS),
    )
    meta = embeddings.meta
    assert (
        meta["arm"] == "hu-histogram" and meta["model"] == "hu-histogram" and meta["default_feature"] == "first_order"
    )
    assert meta["feature_columns"] == FEATURE_COLUMNS
    np.testing.assert_array_equal(
        embeddings.features["first_order"][[3]], first_order_features(_hu(store, ["s003"])).numpy()
    )

    columns = read_predictions(root / "probe_hu").columns  # probed without --features: the table's own
    assert read_predictions(root / "probe_hu").run["features"] == "first_order"
    columns = read_predictions(root / "probe_hu").columns
    assert set(columns["arm"]) == {"hu-histogram"}
    full = columns["label_fraction"] == "1.0"
    # The blob (100 HU, radius 10 voxels) shifts the histogram: the floor finds it.
    assert roc_auc_score(columns["label"][full], columns["score"][full]) > 0.9


def test_report_names_both_floors_and_whether_the_pretrained_arm_clears_them(cohort, tmp_path):
    root, _, _ = cohort
    folders = [root / name for name in ("probe", "probe_random", "probe_hu")]
    assert main(["report", *map(str, folders), "--out", str(tmp_path / "report.html"), "--bootstrap", "100"]) == 0
    html = (tmp_path / "report.html").read_text()
    summary = html[html.index("<h2 id='summary'>") : html.index("<h2 id='roc'>")]
    assert html.index("<h2 id='summary'>") == html.index("<h2")  # the first section
    # Per floor one sentence over one pretrained arm x one finding x one site group (ID) x two label fractions.
    for floor in ("random-init", "hu-histogram"):
        assert re.search(f"<b>Pretrained beats the {floor} floor at [012] of 2 comparisons</b>", summary), floor


def test_floor_usage_errors_are_one_line(cohort, capsys):
    root, store, run = cohort
    for model, message in (
        (["--model", "scratch"], "needs --like"),
        (["--model", str(run), "--like", str(run)], "--like only"),
    ):
        assert main(["embed", *model, "--store", str(store), "--out", str(root / "bad")]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
