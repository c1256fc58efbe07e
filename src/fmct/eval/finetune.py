"""``fmct finetune``: a backbone and a classification head trained on labelled scans, per label budget and seed.

Model: a backbone (pretrained, or ``scratch``: the same architecture with a random init, the baseline
FM-CT compares against) and one head with one logit per finding:

- ``linear``: a linear layer on the CLS token (FM-CT's classifier);
- ``attentive``: one learned query cross-attending to the patch tokens, then a linear layer. With
  ``trainable_blocks=0`` this is the attentive probe over frozen patch tokens.

Either way the features pass a BatchNorm without affine parameters before the linear layer (as in MAE's
linear probe): a new head then learns at the same pace whatever the scale and spread of the backbone's
features, which differ a lot between a pretrained and a randomly initialised backbone.

``trainable_blocks`` -1 trains the whole backbone; k >= 0 trains only its last k blocks and final norm.

Training: AdamW with layer-wise LR decay (the head at the full LR), linear warm-up then cosine decay;
class-balanced batches (each row draws a finding, then positive or negative with even odds, then a scan
of that class from the finding's training subset); binary cross-entropy over the known labels of the
budget only (unknown labels, and labels outside the finding's training subset, are masked out); early
stopping on the mean validation AUROC over findings, checked every ``eval_every`` steps, keeping the
best weights. Augmentation is pretraining's (:class:`fmct.data.MultiCropAugment` with one global crop and
no local crop, on the device); evaluation sees the whole volume (:func:`fmct.models.windows.model_input`).

The labelled cohort, its splits and label budgets are :mod:`fmct.eval.cohort`'s, as for the probe: each
(budget, seed) trains one model from the training split.

Outputs in ``OUT``: ``predictions.csv`` + ``run.json`` (the format of :mod:`fmct.eval.evaluate`),
``config.yaml``, and for each (budget, seed) ``fits/<budget>-seed<k>/``, a detector folder
(:mod:`fmct.detector`: ``head.safetensors``, the trained backbone as a model folder ``backbone/`` unless a
pretrained one stayed frozen, ``config.json`` with thresholds and calibration set on the validation
split, a model card) and ``fit.json``, written last: a re-run skips every fit whose ``fit.json`` exists.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmct import detector, hub, saliency
from fmct.atomic import atomic_write_text
from fmct.config import save_config, to_dict
from fmct.data import AugmentConfig, MultiCropAugment, StoreVolumes, step_generator
from fmct.data.batches import read_hu_batches, to_device
from fmct.devices import autocast, default_device
from fmct.errors import ConfigError, InputError, UsageError
from fmct.eval import calibration
from fmct.eval.cohort import EVALUATED_SPLITS, Budget, Cohort, CohortConfig, FitSummary, load_cohort
from fmct.eval.evaluate import write_predictions
from fmct.eval.metrics import auroc
from fmct.fingerprint import file_sha256, settings_sha256
from fmct.log import progress_bar
from fmct.models import ViT3DConfig
from fmct.models.classifier import HEADS, Classifier
from fmct.models.vit3d import grouped_parameters
from fmct.models.windows import model_input
from fmct.paths import relative_to
from fmct.schedules import warmup_cosine
from fmct.store import store_identity


@dataclass
class FinetuneConfig(CohortConfig):
    head: str = "linear"  # linear (on the CLS token) | attentive (one learned query over the patch tokens)
    trainable_blocks: int = -1  # -1: the whole backbone; k >= 0: its last k blocks and final norm
    seeds: int = 3  # seeds 0 .. seeds-1, each its own training subset, head init and batches
    batch_size: int = 8
    max_steps: int = 1000
    eval_every: int = 50  # steps between validation checks
    patience: int = 5  # validation checks without a better AUROC before stopping
    # Validation starts at this step, so the kept weights are never an earlier step's: a network trained
    # from scratch can score its best validation AUROC by luck at the first checks, before it has learned
    # anything, and early stopping would keep those weights and end the fit there.
    min_steps: int = 0
    lr: float = 1e-4  # peak LR of the head and the last block; lower blocks get lr * layer_decay ** depth_below
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 3.0  # max global gradient norm; 0: no clipping
    workers: int = 4  # reader threads
    # Training views: one crop per scan of this share of the volume, resized to the model's input, with a
    # flip per axis (x left-right, y, z) at flip_prob, a rotation up to rotation_deg and, on
    # intensity_prob of the crops, window jitter, noise and gamma (AugmentConfig's).
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip_prob: tuple[float, float, float] = (0.5, 0.0, 0.0)
    rotation_deg: float = 10.0
    intensity_prob: float = 0.8
    # The architecture of `--model scratch` without `--like`.
    model: ViT3DConfig = field(default_factory=ViT3DConfig)
    name: str = ""  # model name in the predictions; empty: from the model folder
    arm: str = ""  # empty: "pretrained", or "scratch" for --model scratch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r}: choose {' or '.join(HEADS)}")
        if self.trainable_blocks < -1:
            raise ConfigError(f"trainable_blocks {self.trainable_blocks}: -1 (all) or k >= 0")
        # The views' settings are checked where augmentation defines them, when the config is read.
        self.flip_prob = self.views(global_size=1).flip_prob
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip {self.grad_clip}: a gradient norm > 0, or 0 for no clipping")
        # seeds and first_seed are checked by CohortConfig.
        if min(self.max_steps, self.eval_every, self.patience) < 1 or self.batch_size < 2 or self.min_steps < 0:
            raise ConfigError(
                "batch_size must be at least 2 (the head's batch norm); "
                "max_steps, eval_every and patience at least 1, min_steps at least 0"
            )

    def views(self, global_size: int, windows: list[tuple[float, float]] | None = None) -> AugmentConfig:
        """The training views' augmentation: one global crop of ``global_size`` voxels per scan, no local
        crop, no blur; ``windows`` (level, width) in HU, the model's."""
        windows = {} if windows is None else {"windows": list(windows)}
        return AugmentConfig(
            n_global=1,
            n_local=0,
            global_size=global_size,
            global_scale=self.crop_scale,
            flip_prob=self.flip_prob,
            rotation_deg=self.rotation_deg,
            intensity_prob=self.intensity_prob,
            blur_prob=0.0,
            **windows,
        )


def resolve_backbone(model: str, like: str | None, config: FinetuneConfig) -> tuple[hub.ModelSource, str]:
    """The backbone of ``--model RUN|DIR|NAME|scratch`` (``--like``: the architecture and windows of a
    scratch model; without it, ``config.model``) and its arm name."""
    source = hub.resolve_model(model, like, architecture=config.model)
    if config.name:
        source.name = config.name
    return source, config.arm or ("scratch" if source.is_random_init else "pretrained")


# --------------------------------------------------------------------------------------- training
def balanced_batches(
    subsets: list[tuple[np.ndarray, np.ndarray]], batch_size: int, n_steps: int, rng: np.random.Generator
) -> list[list[int]]:
    """``n_steps`` batches of row indices: per row a finding uniformly, then its positives or negatives
    with even odds, then a row of that class uniformly. ``subsets[f]`` = (positive rows, negative rows)."""
    findings = rng.integers(len(subsets), size=(n_steps, batch_size))
    positive = rng.random((n_steps, batch_size)) < 0.5
    batches = []
    for step in range(n_steps):
        batch = []
        for f, is_positive in zip(findings[step], positive[step]):
            rows = subsets[f][0] if is_positive else subsets[f][1]
            batch.append(int(rows[rng.integers(len(rows))]))
        batches.append(batch)
    return batches


class _Scans:
    """The cohort's scans on the store: batches of cohort rows read as int16 HU, and whole-volume predictions."""

    def __init__(
        self, volumes: StoreVolumes, volume_of_row: np.ndarray, windows, config: FinetuneConfig, device: torch.device
    ):
        self.volumes, self.volume_of_row, self.windows = volumes, volume_of_row, windows
        self.config, self.device = config, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def batches(self, row_batches: list[list[int]]):
        volume_batches = [[int(self.volume_of_row[r]) for r in rows] for rows in row_batches]
        return read_hu_batches(self.volumes, volume_batches, self.config.workers, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def predict(self, classifier: Classifier, rows: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """Logits (len(rows), n_findings) of whole volumes, and {row: reason} of scans that could not be read."""
        classifier.eval()
        size = self.config.batch_size
        row_batches = [rows[s : s + size].tolist() for s in range(0, len(rows), size)]
        logits, failed = [], {}
        reader = self.batches(row_batches)
        try:
            for batch_rows, batch in zip(row_batches, reader):
                x = model_input(
                    to_device(batch.hu, self.device, self.copy_stream),
                    classifier.backbone.config.img_size,
                    self.windows,
                )
                with autocast(self.device):
                    logits.append(classifier(x).float())
                failed.update({batch_rows[row]: reason for row, reason in batch.failed.items()})
        finally:
            reader.close()
        if not logits:
            return np.zeros((0, classifier.linear.out_features)), failed
        return torch.cat(logits).cpu().numpy(), failed


def _validation_auroc(logits: np.ndarray, labels: np.ndarray, usable: np.ndarray) -> float:
    """Mean AUROC over findings with both classes among the ``usable`` rows; NaN when none has."""
    values = []
    for f in range(labels.shape[1]):
        known = usable & ~np.isnan(labels[:, f])
        if len(set(labels[known, f].tolist())) == 2:
            values.append(float(auroc(labels[known, f], logits[known, f])))
    return float(np.mean(values)) if values else float("nan")


def _train_one(
    classifier: Classifier,
    scans: _Scans,
    targets: np.ndarray,
    mask: np.ndarray,
    subsets: list[tuple[np.ndarray, np.ndarray]],
    val_rows: np.ndarray,
    val_labels: np.ndarray,
    seed: int,
) -> dict:
    """Train ``classifier`` in place (ending with its best validation weights); return what happened."""
    config, device = scans.config, scans.device
    groups = classifier.backbone.param_groups(config.weight_decay, config.layer_decay)
    groups += grouped_parameters(iter(classifier.head_parameters()), lambda name: 1.0, config.weight_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=config.lr)
    trained = [p for p in classifier.parameters() if p.requires_grad]  # what the gradient clip sees
    size = classifier.backbone.config.img_size
    if len(set(size)) != 1:
        raise UsageError(f"finetune needs a cubic model input, the model's img_size is {list(size)}")
    augment = MultiCropAugment(config.views(size[0], scans.windows))
    targets_device = torch.as_tensor(targets, dtype=torch.float32, device=device)
    mask_device = torch.as_tensor(mask, dtype=torch.float32, device=device)

    row_batches = balanced_batches(subsets, config.batch_size, config.max_steps, np.random.default_rng([seed, 7]))
    best = {"val_auroc": float("nan"), "step": 0, "state": None}
    checks_without_gain, losses, step, ended_by = 0, [], 0, "max_steps"
    checked: dict[str, str] = {}  # what the progress bar shows: the step's loss, the last check's AUROCs
    reader = scans.batches(row_batches)
    # Early stopping usually ends a fit long before max_steps: the bar's total is the cap, its postfix the state.
    progress = progress_bar(total=config.max_steps, desc="  steps", unit="step", leave=False)
    try:
        classifier.train()
        for step, (rows, batch) in enumerate(zip(row_batches, reader), start=1):
            for group in optimizer.param_groups:
                group["lr"] = (
                    config.lr
                    * group["lr_scale"]
                    * warmup_cosine(step - 1, config.max_steps, config.warmup_steps, peak=1.0, end=0.0)
                )
            crops, _ = augment(to_device(batch.hu, device, scans.copy_stream), step_generator(seed, step))
            row_index = torch.as_tensor(rows, device=device)
            weight = mask_device[row_index]
            if batch.failed:
                weight[list(batch.failed)] = 0.0
            with autocast(device):
                logits = classifier(crops)
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), targets_device[row_index], weight=weight, reduction="sum"
            ) / weight.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            losses.append(loss.detach())
            # Every step: its loss beside the last check's validation AUROC (one host sync per step; the
            # step itself is far longer).
            checked["loss"] = f"{float(losses[-1]):.3f}"
            progress.set_postfix(checked, refresh=False)
            progress.update()
            if (step % config.eval_every == 0 and step >= config.min_steps) or step == config.max_steps:
                logits_val, failed = scans.predict(classifier, val_rows)
                usable = np.array([r not in failed for r in val_rows.tolist()], dtype=bool)
                value = _validation_auroc(logits_val, val_labels, usable)
                classifier.train()
                if math.isnan(value):
                    continue  # no validation finding with both classes: train to the end
                if math.isnan(best["val_auroc"]) or value > best["val_auroc"]:
                    state = {name: tensor.detach().clone() for name, tensor in classifier.trained_state().items()}
                    best = {"val_auroc": value, "step": step, "state": state}
                    checks_without_gain = 0
                else:
                    checks_without_gain += 1
                checked.update(val_auroc=f"{value:.3f}", best=f"{best['val_auroc']:.3f}@{best['step']}")
                progress.set_postfix(checked)
                if checks_without_gain >= config.patience:
                    ended_by = "early_stopping"
                    break
    finally:
        progress.close()
        reader.close()
    if best["state"] is not None:
        classifier.load_state_dict(best["state"], strict=False)
    return {
        "steps": step,
        "ended_by": ended_by,
        "best_step": best["step"] if best["state"] is not None else step,
        "val_auroc": best["val_auroc"],
        "chosen_on": "val" if best["state"] is not None else "last",
        "final_train_loss": float(torch.stack(losses[-config.eval_every :]).mean()) if losses else float("nan"),
    }


# ------------------------------------------------------------------------------------------- run
def _fingerprint(config: FinetuneConfig, backbone: hub.ModelSource, arm: str, labels_sha256: str, store: Path) -> str:
    # What decides a fit's result; budgets and seeds name the fit, workers only change the speed.
    settings = {
        k: v
        for k, v in to_dict(config).items()
        if k not in ("label_fractions", "shots", "seeds", "first_seed", "workers")
    }
    return settings_sha256(
        {
            "config": settings,
            "backbone": backbone.identity(),
            "arm": arm,
            "labels": labels_sha256,
            "store": store_identity(store),
        }
    )


def _save_fit(
    folder: Path, classifier: Classifier, backbone: hub.ModelSource, config: FinetuneConfig, fit: dict, target: dict
) -> None:
    """Write the fit's detector folder (the backbone first when training changed it, or when it is a random
    init that no folder holds), then ``fit.json``, last: the fit is finished."""
    head = {name: value for name, value in classifier.state_dict().items() if not name.startswith("backbone.")}
    if config.trainable_blocks != 0 or backbone.is_random_init:
        hub.save(
            classifier.backbone,
            folder / detector.BACKBONE_DIR,
            extra={"windows": [list(w) for w in backbone.windows], "finetuned_from": backbone.identity()},
        )
        reference = {
            "path": detector.BACKBONE_DIR,
            "name": backbone.name,
            "shipped": False,
            "sha256": file_sha256(folder / detector.BACKBONE_DIR / hub.WEIGHTS_FILE),
        }
    else:
        reference = detector.backbone_reference(backbone)
    summary = fit.pop("detector")
    if summary["per_finding"]:
        detector.write_detector(
            folder,
            {
                **target,
                "backbone": reference,
                "findings": list(summary["per_finding"]),
                "per_finding": summary["per_finding"],
                "left_out": summary["left_out"],
                "provenance": {
                    **target["provenance"],
                    "seed": fit["seed"],
                    "budget": {"label_fraction": fit["label_fraction"], "shots": fit["shots"]},
                    "n_train": summary["n_train"],
                    "metrics": summary["metrics"],
                    "recipe": {**target["provenance"]["recipe"], "steps": fit["steps"], "best_step": fit["best_step"]},
                },
            },
            head,
        )
    else:
        fit["no_detector"] = "; ".join(f"{f}: {reason}" for f, reason in summary["left_out"].items())
    atomic_write_text(folder / "fit.json", json.dumps(fit, indent=2, default=str))  # last: the fit is finished


def run_finetune(
    model: str,
    store_path: str | os.PathLike,
    labels_spec: str,
    out: str | os.PathLike,
    config: FinetuneConfig,
    like: str | None = None,
    rename: dict[str, str] | None = None,
    device: str | torch.device | None = None,
    saliency_examples: int = 0,
) -> FitSummary:
    """Fine-tune ``model`` (a model folder, a pretraining run, a shipped name, or ``scratch``) on the
    labelled scans of the store for every (label budget, seed); write predictions, ``run.json`` and
    ``config.yaml`` into ``out``. ``saliency_examples`` N > 0: saliency PNGs of the N highest-scoring true
    and false positives per finding and site group, for ``fmct report`` (:func:`fmct.saliency.write_examples`).

    ``labels_spec`` is a labels file as :func:`fmct.datasets.load_labels` reads it; ``like`` gives a
    scratch model its architecture and windows. ``device`` defaults to CUDA when available.
    """
    out, device = Path(out), default_device(device)
    backbone, arm = resolve_backbone(model, like, config)
    volumes = StoreVolumes(store_path)
    cohort = load_cohort(labels_spec, volumes.scan_ids, f"the store {store_path}", config, store_path, rename)
    volume_index = {s: i for i, s in enumerate(volumes.scan_ids)}
    scans = _Scans(volumes, np.array([volume_index[s] for s in cohort.scan_ids]), backbone.windows, config, device)
    trainable = [f for f in range(len(cohort.findings)) if cohort.untrainable_reason(f) is None]
    skipped = [cohort.untrainable_reason(f) for f in range(len(cohort.findings)) if f not in trainable]
    if not trainable:
        raise InputError(f"{cohort.origin}: no finding can be trained ({'; '.join(skipped)})")
    labels_sha256 = file_sha256(cohort.origin)
    fingerprint = _fingerprint(config, backbone, arm, labels_sha256, Path(store_path))
    target = {  # what every fit's detector folder shares
        "kind": "finetune",
        "head": config.head,
        "feature": "",
        "scorer_outputs": list(cohort.findings),
        "windows_hu": [list(w) for w in backbone.windows],
        "input_size": list(backbone.config.img_size),
        **detector.store_grid(store_path),
        "provenance": {
            "verb": "finetune",
            "labels": {"spec": labels_spec, "sha256": labels_sha256},
            "store": store_identity(store_path),
            "synthetic": cohort.synthetic,
            "scans_per_split": cohort.split_counts()["scans_per_split"],
            "ood_sites": list(config.ood_sites),
            "recipe": {
                "backbone": backbone.name,
                "arm": arm,
                "head": config.head,
                "trainable_blocks": config.trainable_blocks,
                "lr": config.lr,
                "max_steps": config.max_steps,
                "batch_size": config.batch_size,
                "split_seed": config.split_seed,
            },
        },
    }

    predictions, fits, n_reused = [], [], 0
    plan = [(seed, budget) for seed in config.seed_range() for budget in config.budgets()]
    for seed, budget in progress_bar(plan, desc="finetune", unit="fit"):
        folder = out / "fits" / f"{budget.name}-seed{seed}"
        fit = _finished_fit(folder, fingerprint)
        if fit is not None:
            n_reused += 1
        else:
            fit = _fit_budget(backbone, arm, scans, cohort, trainable, budget, seed)
            fit["fingerprint"] = fingerprint
            _save_fit(folder, fit.pop("classifier"), backbone, config, fit, target)
        predictions += fit.pop("predictions")
        fits.append(fit)

    run = {
        "command": "finetune",
        "config": to_dict(config),
        "model": backbone.name,
        "arm": arm,
        "backbone": backbone.identity(),
        "labels": {
            "spec": labels_spec,
            "sha256": labels_sha256,
            "notes": cohort.notes + [f"{s}: {r}" for s, r in volumes.skipped],
        },
        "store": relative_to(store_path, out),
        "device": str(device),
        **cohort.split_counts(),
        "fits": fits,
        "skipped": skipped,
    }
    save_config(config, out / "config.yaml")
    write_predictions(out, predictions, run)
    if saliency_examples:
        saliency.write_examples(out, predictions, store_path, saliency_examples, device=device)
    return FitSummary(
        "finetune",
        len(predictions),
        [cohort.findings[f] for f in trainable],
        len(fits),
        n_reused,
        skipped,
        cohort.notes + [f"{s}: {r}" for s, r in volumes.skipped],
    )


def _finished_fit(folder: Path, fingerprint: str) -> dict | None:
    """The record of a fit an earlier run finished in ``folder`` (None: not yet); one made from other
    inputs is a :class:`UsageError`, never silently mixed in."""
    if not (folder / "fit.json").exists():
        return None
    fit = json.loads((folder / "fit.json").read_text())
    if fit.get("fingerprint") != fingerprint:
        raise UsageError(f"{folder / 'fit.json'}: made with another config, model, labels or store; use another --out")
    return fit


def _fit_budget(
    backbone: hub.ModelSource, arm: str, scans: _Scans, cohort: Cohort, trainable: list[int], budget: Budget, seed: int
) -> dict:
    """Train one model for one (budget, seed); return its fit record with predictions and the classifier."""
    config, y = scans.config, cohort.labels
    mask = np.zeros_like(y)
    subsets, counts = [], {}
    for f in trainable:
        chosen = cohort.training_rows(f, budget, seed)
        mask[chosen, f] = 1.0
        subsets.append((chosen[y[chosen, f] == 1], chosen[y[chosen, f] == 0]))
        counts[cohort.findings[f]] = {"n_train_pos": len(subsets[-1][0]), "n_train_neg": len(subsets[-1][1])}

    torch.manual_seed(seed)  # the head init of this fit (a scratch backbone is drawn from the same seed first)
    classifier = Classifier(backbone.build(scans.device, seed), len(cohort.findings), config.head).to(scans.device)
    classifier.freeze(config.trainable_blocks)
    val_rows = np.flatnonzero(cohort.split == "val")
    info = _train_one(classifier, scans, np.nan_to_num(y), mask, subsets, val_rows, y[val_rows], seed)
    eval_rows = np.flatnonzero(np.isin(cohort.split, EVALUATED_SPLITS))
    logits, failed = scans.predict(classifier, eval_rows)
    # The validation scores of the kept weights: the thresholds and calibration are set on them.
    val_logits, val_failed = scans.predict(classifier, val_rows)
    finding_fits = {}
    for f in trainable:
        val_keep = [p for p, i in enumerate(val_rows.tolist()) if i not in val_failed and not np.isnan(y[i, f])]
        eval_keep = [p for p, i in enumerate(eval_rows.tolist()) if i not in failed and not np.isnan(y[i, f])]
        finding_fits[f] = calibration.FindingFit(
            np.flatnonzero(mask[:, f]),
            val_rows[val_keep],
            val_logits[val_keep, f],
            eval_rows[eval_keep],
            logits[eval_keep, f],
        )
    summary = calibration.summarise_fit(cohort, finding_fits)
    rows = [
        {
            **cohort.prediction(i, f, logits[position, f], backbone.name, arm, budget, seed),
            **calibration.prediction_columns(summary, cohort.findings[f], logits[position, f]),
        }
        for position, i in enumerate(eval_rows.tolist())
        if i not in failed
        for f in trainable
        if not np.isnan(y[i, f])
    ]
    return {
        "seed": seed,
        "label_fraction": budget.fraction,
        "shots": budget.shots,
        "per_finding": counts,
        **info,
        "unreadable_test_scans": [f"{cohort.scan_ids[i]}: {reason}" for i, reason in failed.items()],
        "predictions": rows,
        "classifier": classifier,
        "detector": summary,
    }
