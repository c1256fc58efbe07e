"""fmct finetune on a separable synthetic store (a bright blob present or absent), with a tiny ViT on the CPU:
from scratch and from a checkpoint, the attentive probe, resume, and the predictions read by evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fmct import hub
from fmct.cli import main
from fmct.errors import ConfigError
from fmct.eval.evaluate import read_predictions
from fmct.eval.finetune import FinetuneConfig, balanced_batches, run_finetune
from fmct.models import ViT3DConfig
from fmct.models.classifier import Classifier
from test_embed import TINY, save_tiny_run, tiny_model, write_blob_store

torch.set_num_threads(1)

N_SCANS = 40
# Explicit splits: 20 train, 8 val, 8 test (site A) and 4 OOD scans (site B).
SPLITS = ["train"] * 20 + ["val"] * 8 + ["test"] * 8 + [""] * 4
SITES = ["A"] * 36 + ["B"] * 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    store, ich = write_blob_store(root, n_scans=N_SCANS, seed=1, splits=SPLITS, sites=SITES)
    return root, store, ich


def quick(**overrides) -> FinetuneConfig:
    settings = dict(
        label_fractions=(1.0,),
        seeds=1,
        batch_size=8,
        max_steps=60,
        eval_every=20,
        patience=2,
        warmup_steps=5,
        lr=1e-3,
        layer_decay=0.75,
        workers=2,
        ood_sites=("B",),
        model=ViT3DConfig(**TINY),
    )
    settings.update(overrides)
    return FinetuneConfig(**settings)


def test_scratch_fine_tune_separates_the_blob_and_evaluate_reads_it(cohort, tmp_path, capsys):
    root, store, ich = cohort
    out = tmp_path / "scratch"
    # grad_clip 0 is no clipping (the other tests clip at the default): a clip to norm 0 would learn nothing.
    summary = run_finetune("scratch", store, str(root / "labels.csv"), out, quick(grad_clip=0.0))
    assert summary.findings == ["ich"] and summary.n_fits == 1
    columns = read_predictions(out).columns
    assert sorted(set(columns["split"])) == ["ood", "test"] and set(columns["arm"]) == {"scratch"}
    assert len(columns["scan_id"]) == 12
    test = columns["split"] == "test"
    auc = roc_auc_score(columns["label"][test].astype(int), columns["score"][test].astype(float))
    assert auc > 0.8, auc
    run = json.loads((out / "run.json").read_text())
    assert run["scans_per_split"] == {"train": 20, "val": 8, "test": 8, "ood": 4}
    fit = run["fits"][0]
    assert fit["per_finding"]["ich"]["n_train_pos"] + fit["per_finding"]["ich"]["n_train_neg"] == 20
    assert fit["chosen_on"] == "val" and 0 < fit["best_step"] <= fit["steps"] <= 60
    assert fit["final_train_loss"] < 0.6  # it learned: a head that guessed would sit at ln 2 = 0.69

    code = main(["evaluate", "--predictions", str(out), "--out", str(tmp_path / "eval"), "--bootstrap", "50"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "scratch" in json.dumps(metrics)


def test_validation_starts_at_min_steps(cohort, tmp_path):
    """With no learning (lr 0) validation barely moves (only the head's batch-norm statistics do), so
    patience 1 would keep step 10's weights and stop at step 20; with min_steps 50 the first check is at
    step 50: no earlier step's weights can be kept."""
    root, store, _ = cohort
    config = quick(lr=0.0, eval_every=10, patience=1, min_steps=50, warmup_steps=0, max_steps=100)
    run_finetune("scratch", store, str(root / "labels.csv"), tmp_path / "ft", config)
    (fit,) = json.loads((tmp_path / "ft" / "run.json").read_text())["fits"]
    assert fit["ended_by"] == "early_stopping" and fit["best_step"] >= 50 and fit["steps"] >= 60, fit
    with pytest.raises(ConfigError, match="min_steps at least 0"):
        quick(min_steps=-1)


def test_fine_tune_from_a_checkpoint_via_cli_then_resume(cohort, tmp_path, capsys):
    root, store, _ = cohort
    run = save_tiny_run(tmp_path / "run")
    argv = [
        "finetune",
        "--model",
        str(run),
        "--store",
        str(store),
        "--labels",
        str(root / "labels.csv"),
        "--out",
        str(tmp_path / "ft"),
        "--label-fractions",
        "0.5,1",
        "--seeds",
        "1",
        "--max-steps",
        "20",
        "--batch-size",
        "4",
        "--lr",
        "0.001",
        "--ood-sites",
        "B",
        "--trainable-blocks",
        "1",
        "eval_every=10",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 fits (0 reused)" in capsys.readouterr().out
    columns = read_predictions(tmp_path / "ft").columns
    assert set(columns["arm"]) == {"pretrained"} and set(columns["model"]) == {"run"}
    assert sorted(set(columns["label_fraction"])) == ["0.5", "1.0"]
    fit_dir = tmp_path / "ft" / "fits" / "fraction1-seed0"
    assert (fit_dir / "head.safetensors").exists() and (fit_dir / "backbone" / "model.safetensors").exists()
    # Only the last block and the final norm were trained: the first block is the checkpoint's.
    tuned, original = hub.load(fit_dir / "backbone"), hub.load(run / "backbone")
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)
    assert not torch.equal(tuned.blocks[1].attn.qkv.weight, original.blocks[1].attn.qkv.weight)
    first = (tmp_path / "ft" / "predictions.csv").read_text()

    assert main(argv) == 0
    assert "2 fits (2 reused)" in capsys.readouterr().out
    assert (tmp_path / "ft" / "predictions.csv").read_text() == first
    assert main(argv[:-1] + ["eval_every=5"]) == 2  # another config must not reuse these fits
    assert "another config" in capsys.readouterr().err


def test_seeds_split_over_runs_evaluate_as_one_run(cohort, tmp_path, capsys):
    """Seeds 0 and 1 in one run, or each in its own run (``--first-seed``): the same fits, so evaluate
    reads the two folders together as the one."""
    root, store, _ = cohort
    like = save_tiny_run(tmp_path / "run")
    common = [
        "finetune",
        "--model",
        "scratch",
        "--like",
        str(like),
        "--store",
        str(store),
        "--labels",
        str(root / "labels.csv"),
    ]
    common += ["--label-fractions", "1", "--max-steps", "20", "--batch-size", "4", "--ood-sites", "B", "eval_every=10"]
    assert main([*common, "--out", str(tmp_path / "both"), "--seeds", "2"]) == 0
    for seed in (0, 1):
        argv = [*common, "--out", str(tmp_path / f"seed{seed}"), "--seeds", "1", "--first-seed", str(seed)]
        assert main(argv) == 0, capsys.readouterr().err
    one = read_predictions(tmp_path / "seed1").columns
    both = read_predictions(tmp_path / "both").columns
    assert set(one["seed"]) == {"1"}
    assert np.array_equal(one["score"], both["score"][both["seed"] == "1"])
    for name, folders in (("joint", ["both"]), ("split", ["seed0", "seed1"])):
        argv = ["evaluate", "--predictions", *[str(tmp_path / f) for f in folders], "--bootstrap", "20"]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
    joint, split = ((tmp_path / name / "metrics.csv").read_text() for name in ("joint", "split"))
    assert joint == split and "scratch" in joint
    assert len(json.loads((tmp_path / "split" / "metrics.json").read_text())["metrics"]) == 2  # ID and OOD
    # A fit in two of the folders would count twice: evaluate names both and stops.
    argv = ["evaluate", "--predictions", str(tmp_path / "both"), str(tmp_path / "seed1"), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "both hold the fit of run (scratch), ich, budget 1.0, seed 1" in error and "seed1" in error


def test_attentive_probe_on_frozen_patch_tokens(cohort, tmp_path):
    root, store, _ = cohort
    run = save_tiny_run(tmp_path / "run")
    summary = run_finetune(
        str(run),
        store,
        str(root / "labels.csv"),
        tmp_path / "attn",
        quick(head="attentive", trainable_blocks=0, max_steps=60, lr=3e-3),
    )
    columns = read_predictions(tmp_path / "attn").columns
    test = columns["split"] == "test"
    auc = roc_auc_score(columns["label"][test].astype(int), columns["score"][test].astype(float))
    assert summary.n_predictions == 12 and auc > 0.8, auc
    assert json.loads((tmp_path / "attn" / "run.json").read_text())["fits"][0]["final_train_loss"] < 0.6
    assert not (tmp_path / "attn" / "fits" / "fraction1-seed0" / "backbone").exists()  # frozen: nothing new to save


def test_freezing_leaves_the_right_parameters_trainable():
    model = Classifier(tiny_model(), n_findings=3, head="attentive")
    model.freeze(0)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pool", "linear"}
    model = Classifier(tiny_model(), n_findings=3)
    model.freeze(1)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(("backbone.blocks.1.", "backbone.norm.", "linear.")) for n in names)
    assert any(n.startswith("backbone.norm.") for n in names) and any(n.startswith("backbone.blocks.1.") for n in names)
    model.train()
    assert not model.backbone.blocks[0].training and model.backbone.blocks[1].training


def test_balanced_batches_draw_both_classes_evenly_and_schedule_shape():
    subsets = [(np.array([0]), np.arange(1, 100)), (np.array([100, 101]), np.array([102]))]
    batches = np.array(balanced_batches(subsets, batch_size=16, n_steps=250, rng=np.random.default_rng(0)))
    share_of_rare_positive = np.mean(batches == 0)
    assert abs(share_of_rare_positive - 0.25) < 0.02  # a finding's positives fill a quarter of the rows


@pytest.mark.slow
def test_the_cpu_scale_backbone_learns_a_small_faint_bleed_from_scratch(tmp_path):
    """A learning check that can fail: the shipped CPU-scale architecture (conv stem + 4 blocks, the
    model section of ``pretrain_synth_tiny``), trained from scratch for at most 400 steps on 72 heads of
    64^3, must detect a blob of radius 3 voxels at 70 HU in a 35 HU brain with 8 HU noise (about 110 of the
    volume's 262,144 voxels) on 24 unseen test heads with AUROC above 0.8."""
    from fmct.config import load_config
    from fmct.ssl.config import PretrainConfig

    splits = ["train"] * 72 + ["val"] * 24 + ["test"] * 24
    store, _ = write_blob_store(tmp_path, n_scans=120, size=64, seed=3, splits=splits, blob_hu=70.0, blob_radius=3.0)
    architecture = load_config(PretrainConfig, "pretrain_synth_tiny").model
    config = quick(
        head="pooled",
        max_steps=400,
        eval_every=25,
        patience=6,
        warmup_steps=20,
        layer_decay=1.0,
        ood_sites=(),
        model=architecture,
    )
    out = tmp_path / "ft"
    run_finetune("scratch", store, str(tmp_path / "labels.csv"), out, config)
    columns = read_predictions(out).columns
    test = columns["split"] == "test"
    auc = roc_auc_score(columns["label"][test].astype(int), columns["score"][test].astype(float))
    assert auc > 0.8, auc


def test_the_training_views_are_checked_when_the_config_is_read():
    assert FinetuneConfig(flip_prob=[0.5, 0.5, 0.5]).flip_prob == (0.5, 0.5, 0.5)
    for bad in ([0.5, 0.5], [0.5, 1.5, 0.0]):
        with pytest.raises(ConfigError, match="flip_prob"):
            FinetuneConfig(flip_prob=bad)
    with pytest.raises(ConfigError, match="global_scale"):
        FinetuneConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="grad_clip"):
        FinetuneConfig(grad_clip=-1.0)
