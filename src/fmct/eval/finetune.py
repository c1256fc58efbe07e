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
no local crop, on the device); evaluation sees the whole volume (:func:`fmct.data.embed_transform`).

Splits and label budgets are the probe's (:func:`fmct.eval.probe.load_cohort`,
:func:`fmct.eval.splits.training_subset`): each (budget, seed) trains one model from the training split.

Outputs in ``OUT``: ``predictions.csv`` + ``run.json`` (the format of :mod:`fmct.eval.evaluate`),
``config.yaml``, and for each (budget, seed) ``fits/<budget>-seed<k>/`` holding ``head.safetensors``,
the trained backbone as a model folder (``backbone/``, unless it stayed frozen) and ``fit.json``, written
last: a re-run skips every fit whose ``fit.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm import tqdm

from fmct import hub
from fmct.config import save_config, to_dict
from fmct.data import DEFAULT_WINDOWS, AugmentConfig, MultiCropAugment, StoreVolumes, embed_transform, step_generator
from fmct.eval.embed import autocast, model_name, model_windows, read_hu_batches, to_device
from fmct.eval.evaluate import write_predictions
from fmct.eval.metrics import auroc
from fmct.eval.probe import Cohort, file_sha256, load_cohort
from fmct.eval.splits import training_subset
from fmct.models import ViT3D, ViT3DConfig
from fmct.models.vit3d import grouped_parameters
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.errors import InputError, UsageError

HEADS = ("linear", "attentive")


@dataclass
class FinetuneConfig:
    head: str = "linear"  # linear (on the CLS token) | attentive (one learned query over the patch tokens)
    trainable_blocks: int = -1  # -1: the whole backbone; k >= 0: its last k blocks and final norm
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    shots: tuple[int, ...] = ()  # N positives and N negatives per finding, in addition to the fractions
    seeds: int = 3  # seeds 0 .. seeds-1, each its own training subset, head init and batches
    split_seed: int = 0
    use_split_column: bool = True  # false: ignore the labels' split column, split every scan by the fractions below
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    ood_sites: tuple[str, ...] = ()  # sites whose scans are test-only (out-of-distribution)
    findings: tuple[str, ...] = ()  # empty: every finding of the labels
    batch_size: int = 8
    max_steps: int = 1000
    eval_every: int = 50  # steps between validation checks
    patience: int = 5  # validation checks without a better AUROC before stopping
    lr: float = 1e-4  # peak LR of the head and the last block; lower blocks get lr * layer_decay ** depth_below
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 3.0  # max global gradient norm
    workers: int = 4  # reader threads
    # Training views: one crop per scan of this share of the volume, resized to the model's input, with
    # pretraining's left-right flip, small rotation and intensity jitter (AugmentConfig's defaults).
    crop_scale: tuple[float, float] = (0.6, 1.0)
    # The architecture of `--model scratch` without `--like`.
    model: ViT3DConfig = field(default_factory=ViT3DConfig)
    name: str = ""  # model name in the predictions; empty: from the model folder
    arm: str = ""  # empty: "pretrained", or "scratch" for --model scratch

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r}: choose {' or '.join(HEADS)}")
        if self.trainable_blocks < -1:
            raise ValueError(f"trainable_blocks {self.trainable_blocks}: -1 (all) or k >= 0")
        if min(self.max_steps, self.eval_every, self.patience, self.seeds) < 1 or self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (the head's batch norm); max_steps, eval_every, patience and seeds at least 1")


@dataclass
class FinetuneSummary:
    n_predictions: int
    findings: list[str]
    n_fits: int
    n_fits_reused: int
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self, out: Path) -> str:
        lines = [f"finetune: {self.n_fits} fits ({self.n_fits_reused} reused), {self.n_predictions} predictions for "
                 f"{', '.join(self.findings) or 'no finding'} -> {out / 'predictions.csv'}"]
        lines += [f"  skipped {s}" for s in self.skipped] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ model
class AttentivePooling(nn.Module):
    """One learned query cross-attending to tokens: (B, N, C) -> (B, C)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attention = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, _ = self.attention(query, tokens, tokens, need_weights=False)
        return self.norm(pooled[:, 0])


class Classifier(nn.Module):
    """Backbone + head: windowed volumes (B, C, D, H, W) in [0, 1] -> logits (B, n_findings)."""

    def __init__(self, backbone: ViT3D, n_findings: int, head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.pool = AttentivePooling(dim, backbone.config.n_heads) if head == "attentive" else None
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, n_findings)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        features = self.pool(tokens["patch"]) if self.pool is not None else tokens["cls"]
        return self.linear(self.norm(features))

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The state that training changes: trainable parameters and the head's buffers (batch-norm statistics)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {name: value for name, value in self.state_dict().items()
                if name in trainable or not name.startswith("backbone.")}

    def freeze(self, trainable_blocks: int) -> None:
        """Train only the last ``trainable_blocks`` blocks and the final norm (-1: the whole backbone)."""
        if trainable_blocks < 0:
            return
        depth = self.backbone.config.depth
        for name, param in self.backbone.named_parameters():
            layer = self.backbone.layer_id(name)  # 0 embeddings, i + 1 block i, depth + 1 final norm
            param.requires_grad_(trainable_blocks > 0 and layer >= depth + 1 - trainable_blocks)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # Frozen blocks stay in eval mode: stochastic depth must not perturb features nobody trains.
        for block in self.backbone.blocks:
            if not any(p.requires_grad for p in block.parameters()):
                block.eval()
        return self


@dataclass
class Backbone:
    """Where the backbone comes from: a model folder (``pretrained``) or an architecture (``scratch``)."""

    arm: str
    name: str
    config: ViT3DConfig
    windows: list[tuple[float, float]]
    model_dir: Path | None = None  # None: random init
    sha256: str = ""

    def build(self, device: torch.device, seed: int) -> ViT3D:
        """The backbone on ``device``: the saved weights, or a random init drawn from ``seed``."""
        if self.model_dir is not None:
            return hub.load(self.model_dir, device)
        return hub.random_init(self.config, seed, device)

    def identity(self) -> dict:
        return {"arm": self.arm, "name": self.name, "model_path": str(self.model_dir.resolve()) if self.model_dir else "",
                "checkpoint_sha256": self.sha256, "model_config": to_dict(self.config), "windows_hu": self.windows}


def resolve_backbone(model: str, like: str | None, config: FinetuneConfig) -> Backbone:
    """The :class:`Backbone` for ``--model RUN|DIR|scratch`` (``--like RUN|DIR``: the architecture and
    windows of a scratch model). Raises :class:`fmct.errors.CheckpointError` for a bad folder."""
    if model == "scratch":
        if like is None:
            return Backbone(config.arm or "scratch", config.name or f"vit-{config.model.size}", config.model, list(DEFAULT_WINDOWS))
        like_dir = hub.resolve_model_dir(like)
        architecture = hub.read_architecture(like_dir)
        return Backbone(config.arm or "scratch", config.name or model_name(like_dir), architecture, model_windows(like_dir))
    if like is not None:
        raise UsageError("--like only applies to --model scratch")
    model_dir = hub.resolve_model_dir(model)
    architecture = hub.read_architecture(model_dir)
    return Backbone(config.arm or "pretrained", config.name or model_name(model_dir), architecture,
                    model_windows(model_dir), model_dir, file_sha256(model_dir / hub.WEIGHTS_FILE))


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


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Share of the peak LR at ``step``: linear warm-up over ``warmup_steps``, then cosine to 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Scans:
    """The cohort's scans on the store: batches of cohort rows read as int16 HU, and whole-volume predictions."""

    def __init__(self, volumes: StoreVolumes, volume_of_row: np.ndarray, windows, config: FinetuneConfig,
                 device: torch.device):
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
                x = embed_transform(to_device(batch.hu, self.device, self.copy_stream), classifier.backbone.config.img_size, self.windows)
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
    classifier: Classifier, scans: _Scans, targets: np.ndarray, mask: np.ndarray,
    subsets: list[tuple[np.ndarray, np.ndarray]], val_rows: np.ndarray, val_labels: np.ndarray, seed: int,
) -> dict:
    """Train ``classifier`` in place (ending with its best validation weights); return what happened."""
    config, device = scans.config, scans.device
    groups = classifier.backbone.param_groups(config.weight_decay, config.layer_decay)
    groups += grouped_parameters(iter(classifier.head_parameters()), lambda name: 1.0, config.weight_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=config.lr)
    size = classifier.backbone.config.img_size
    if len(set(size)) != 1:
        raise UsageError(f"finetune needs a cubic model input, the model's img_size is {list(size)}")
    augment = MultiCropAugment(AugmentConfig(n_global=1, n_local=0, global_size=size[0], global_scale=config.crop_scale,
                                             windows=list(scans.windows), blur_prob=0.0))
    targets_device = torch.as_tensor(targets, dtype=torch.float32, device=device)
    mask_device = torch.as_tensor(mask, dtype=torch.float32, device=device)

    row_batches = balanced_batches(subsets, config.batch_size, config.max_steps, np.random.default_rng([seed, 7]))
    best = {"val_auroc": float("nan"), "step": 0, "state": None}
    checks_without_gain, losses, step = 0, [], 0
    reader = scans.batches(row_batches)
    try:
        classifier.train()
        for step, (rows, batch) in enumerate(zip(row_batches, reader), start=1):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group["lr_scale"] * lr_factor(step - 1, config.warmup_steps, config.max_steps)
            crops, _ = augment(to_device(batch.hu, device, scans.copy_stream), step_generator(seed, step))
            row_index = torch.as_tensor(rows, device=device)
            weight = mask_device[row_index]
            if batch.failed:
                weight[list(batch.failed)] = 0.0
            with autocast(device):
                logits = classifier(crops)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets_device[row_index], weight=weight,
                                                      reduction="sum") / weight.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in classifier.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
            losses.append(loss.detach())
            if step % config.eval_every == 0 or step == config.max_steps:
                logits_val, failed = scans.predict(classifier, val_rows)
                usable = np.array([r not in failed for r in val_rows.tolist()], dtype=bool)
                value = _validation_auroc(logits_val, val_labels, usable)
                classifier.train()
                if math.isnan(value):
                    continue  # no validation finding with both classes: train to the end
                if math.isnan(best["val_auroc"]) or value > best["val_auroc"]:
                    state = {name: value.detach().clone() for name, value in classifier.trained_state().items()}
                    best = {"val_auroc": value, "step": step, "state": state}
                    checks_without_gain = 0
                else:
                    checks_without_gain += 1
                    if checks_without_gain >= config.patience:
                        break
    finally:
        reader.close()
    if best["state"] is not None:
        classifier.load_state_dict(best["state"], strict=False)
    return {
        "steps": step, "best_step": best["step"] if best["state"] is not None else step,
        "val_auroc": best["val_auroc"], "chosen_on": "val" if best["state"] is not None else "last",
        "final_train_loss": float(torch.stack(losses[-config.eval_every:]).mean()) if losses else float("nan"),
    }


# ------------------------------------------------------------------------------------------- run
def _budget_name(fraction: float | None, shots: int | None) -> str:
    return f"fraction{fraction:g}" if fraction is not None else f"shots{shots}"


def _fingerprint(config: FinetuneConfig, backbone: Backbone, labels_sha256: str, store: Path) -> str:
    # What decides a fit's result; budgets and seeds name the fit, workers only change the speed.
    settings = {k: v for k, v in to_dict(config).items() if k not in ("label_fractions", "shots", "seeds", "workers")}
    identity = {"config": settings, "backbone": backbone.identity(), "labels": labels_sha256, "store": str(store.resolve())}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _save_fit(folder: Path, classifier: Classifier, backbone: Backbone, config: FinetuneConfig, fit: dict) -> None:
    head = {name: value.detach().cpu().contiguous() for name, value in classifier.state_dict().items()
            if not name.startswith("backbone.")}
    atomic_write_bytes(folder / "head.safetensors", safetensors_bytes(head, metadata={"format": "pt"}))
    if config.trainable_blocks != 0:
        hub.save(classifier.backbone, folder / "backbone",
                 extra={"windows": [list(w) for w in backbone.windows], "finetuned_from": backbone.identity()})
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
) -> FinetuneSummary:
    """Fine-tune ``model`` (a model folder, a pretraining run, or ``scratch``) on the labelled scans of the
    store for every (label budget, seed); write predictions, ``run.json`` and ``config.yaml`` into ``out``.

    ``labels_spec`` is a labels file as :func:`fmct.datasets.load_labels` reads it; ``like`` gives a
    scratch model its architecture and windows. ``device`` defaults to CUDA when available.
    """
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = resolve_backbone(model, like, config)
    windows = backbone.windows
    volumes = StoreVolumes(store_path)
    cohort: Cohort = load_cohort(labels_spec, volumes.scan_ids, f"the store {store_path}", config, store_path, rename)
    notes = list(cohort.notes) + [f"{s}: {reason}" for s, reason in volumes.skipped]
    volume_index = {s: i for i, s in enumerate(volumes.scan_ids)}
    volume_of_row = np.array([volume_index[s] for s in cohort.scan_ids])
    scans = _Scans(volumes, volume_of_row, windows, config, device)
    y, split, findings = cohort.labels, cohort.split, cohort.findings
    labels_sha256 = file_sha256(cohort.origin)
    fingerprint = _fingerprint(config, backbone, labels_sha256, Path(store_path))

    trainable_findings, skipped = [], []
    for f, finding in enumerate(findings):
        train_labels = y[(split == "train") & ~np.isnan(y[:, f]), f]
        evaluated = np.isin(split, ("test", "ood")) & ~np.isnan(y[:, f])
        if len(set(train_labels.tolist())) < 2 or not evaluated.any():
            skipped.append(f"{finding}: the training split needs a positive and a negative, and a test scan must exist")
        else:
            trainable_findings.append(f)
    if not trainable_findings:
        raise InputError(f"{cohort.origin}: no finding can be trained ({'; '.join(skipped)})")

    val_rows = np.flatnonzero(split == "val")
    eval_rows = np.flatnonzero(np.isin(split, ("test", "ood")))
    budgets = [(f, None) for f in config.label_fractions] + [(None, n) for n in config.shots]
    predictions, fits, n_reused = [], [], 0
    progress = tqdm(total=config.seeds * len(budgets), desc="finetune", unit="fit")
    for seed in range(config.seeds):
        for fraction, shots in budgets:
            folder = out / "fits" / f"{_budget_name(fraction, shots)}-seed{seed}"
            if (folder / "fit.json").exists():
                fit = json.loads((folder / "fit.json").read_text())
                if fit.get("fingerprint") != fingerprint:
                    raise UsageError(f"{folder / 'fit.json'}: made with another config, model, labels or store; use another --out")
                n_reused += 1
            else:
                fit = _fit_budget(backbone, scans, cohort, trainable_findings, val_rows, eval_rows, fraction, shots, seed)
                fit["fingerprint"] = fingerprint
                _save_fit(folder, fit.pop("classifier"), backbone, config, fit)
            predictions += fit["predictions"]
            fits.append({k: v for k, v in fit.items() if k != "predictions"})
            progress.update()
    progress.close()

    run = {
        "command": "finetune",
        "config": to_dict(config),
        "model": backbone.name,
        "arm": backbone.arm,
        "backbone": backbone.identity(),
        "labels": {"spec": labels_spec, "sha256": labels_sha256, "notes": notes},
        "store": str(Path(store_path).resolve()),
        "device": str(device),
        **cohort.split_counts(),
        "fits": fits,
        "skipped": skipped,
    }
    save_config(config, out / "config.yaml")
    write_predictions(out, predictions, run)
    return FinetuneSummary(len(predictions), [findings[f] for f in trainable_findings], len(fits), n_reused, skipped, notes)


def _fit_budget(
    backbone: Backbone, scans: _Scans, cohort: Cohort, trainable_findings: list[int], val_rows: np.ndarray,
    eval_rows: np.ndarray, fraction: float | None, shots: int | None, seed: int,
) -> dict:
    """Train one model for one (budget, seed); return its fit record with predictions and the classifier."""
    config, y, findings = scans.config, cohort.labels, cohort.findings
    mask = np.zeros_like(y)
    subsets, counts = [], {}
    for f in trainable_findings:
        train = np.flatnonzero((cohort.split == "train") & ~np.isnan(y[:, f]))
        chosen = train[training_subset(y[train, f], seed, findings[f], fraction=fraction, shots=shots)]
        mask[chosen, f] = 1.0
        subsets.append((chosen[y[chosen, f] == 1], chosen[y[chosen, f] == 0]))
        counts[findings[f]] = {"n_train_pos": len(subsets[-1][0]), "n_train_neg": len(subsets[-1][1])}

    torch.manual_seed(seed)  # the head init of this fit (a scratch backbone is drawn from the same seed first)
    classifier = Classifier(backbone.build(scans.device, seed), len(findings), config.head).to(scans.device)
    classifier.freeze(config.trainable_blocks)
    info = _train_one(classifier, scans, np.nan_to_num(y), mask, subsets, val_rows, y[val_rows], seed)
    logits, failed = scans.predict(classifier, eval_rows)
    rows = []
    for position, i in enumerate(eval_rows.tolist()):
        if i in failed:
            continue
        for f in trainable_findings:
            if np.isnan(y[i, f]):
                continue
            rows.append({
                "scan_id": cohort.scan_ids[i], "patient_id": cohort.patients[i], "site": cohort.sites[i],
                "split": cohort.split[i], "finding": findings[f], "label": int(y[i, f]), "score": float(logits[position, f]),
                "model": backbone.name, "arm": backbone.arm, "label_fraction": "" if fraction is None else fraction,
                "seed": seed, "shots": "" if shots is None else shots,
            })
    return {
        "seed": seed, "label_fraction": fraction, "shots": shots, "per_finding": counts, **info,
        "unreadable_test_scans": [f"{cohort.scan_ids[i]}: {reason}" for i, reason in failed.items()],
        "predictions": rows, "classifier": classifier,
    }
