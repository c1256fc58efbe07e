"""The plain 3D CNN of shared FINDINGS.md beside fmct's CPU-scale backbone, both trained from scratch by
one identical loop on the same store, split and labels: is the backbone below the CNN, or level with it?

The CNN: four stages of two 3x3x3 convolutions (BatchNorm, ReLU) at 8, 16, 32, 64 channels, a 2x max-pool
between stages (64³ -> 8³), the global max and mean of the last stage -> one linear logit; 0.2 M parameters.
The backbone: ``ViT3D`` as ``pretrain_synth_tiny`` builds it, under ``Classifier``'s pooled head. The loop
(the CNN's recipe): AdamW 1e-3, weight decay 1e-4, batches of 4 positive and 4 negative training scans,
each flipped at random on every axis, ``--epochs`` epochs of (training scans / 8) steps, the weights of the
epoch with the best validation AUROC, then ID and OOD test AUROC. Input: the model's HU windows of the
store's volumes, held in memory. One JSON line per model and seed. On 2 cores alone: about 13 min per CNN
fit, 3 min per backbone fit.

The demo's validation split (36 scans, 12 positive) cannot rank candidates whose AUROCs differ by less
than about 0.15. ``--selection-store``/``--selection-labels`` name a larger labelled cohort, disjoint from
the test splits (e.g. other synthetic heads of the in-distribution sites): every fit's chosen weights are
also scored on all of it (``selection_auroc``), a second validation figure to choose by, never a test one.
``--backbone-overrides`` changes the backbone's architecture, e.g. ``model.depth=0``.

    python benchmarks/cnn_reference.py --store demo_out/store --labels demo_out/cohort/labels.csv \
        [--finding ich] [--seeds 0 1] [--epochs 25] [--models cnn backbone] \
        [--selection-store sel/store --selection-labels sel/cohort/labels.csv] [--backbone-overrides model.depth=0]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from fmct.config import load_config
from fmct.eval.cohort import CohortConfig, load_cohort
from fmct.models.classifier import Classifier
from fmct.models.vit3d import ViT3D
from fmct.models.windows import model_input
from fmct.ssl.config import PretrainConfig
from fmct.store import Store

RECIPE = "pretrain_synth_tiny"  # the backbone's architecture


class PlainCNN(nn.Module):
    """FINDINGS.md's CNN: windowed volumes (B, 3, D, H, W) in [0, 1] -> logits (B,)."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_chans
        for stage, width in enumerate(channels):
            if stage:
                layers.append(nn.MaxPool3d(2))
            for conv_in in (previous, width):
                layers += [nn.Conv3d(conv_in, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return self.linear(torch.cat([maps.amax(dim=(2, 3, 4)), maps.mean(dim=(2, 3, 4))], dim=1))[:, 0]


class BackboneClassifier(nn.Module):
    """fmct's CPU-scale backbone under the pooled head, for one finding: (B, 3, D, H, W) -> logits (B,).
    ``overrides``: key=value changes of the pretraining recipe's ``model`` section."""

    def __init__(self, overrides: tuple[str, ...] = ()):
        super().__init__()
        self.classifier = Classifier(ViT3D(load_config(PretrainConfig, RECIPE, list(overrides)).model), 1, "pooled")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)[:, 0]


MODELS = {"cnn": PlainCNN, "backbone": BackboneClassifier}


@torch.no_grad()
def _scores(model: nn.Module, volumes: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    model.eval()
    scores = torch.cat([model(volumes[rows[s : s + 8]]) for s in range(0, len(rows), 8)]).numpy()
    model.train()
    return scores


def train_and_test(
    name: str,
    volumes: torch.Tensor,
    labels: np.ndarray,
    split: np.ndarray,
    seed: int,
    epochs: int,
    selection: tuple[torch.Tensor, np.ndarray] | None = None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """One fit of model ``name``: the figures of its best validation epoch (and on ``selection``, windowed
    volumes and their labels, when given)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MODELS[name](overrides) if name == "backbone" else MODELS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test", "ood")}
    positives = rows["train"][labels[rows["train"]] == 1]
    negatives = rows["train"][labels[rows["train"]] == 0]
    best = {"val_auroc": -1.0}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for _ in range(len(rows["train"]) // 8):
            batch = np.concatenate([rng.choice(positives, 4), rng.choice(negatives, 4)])
            x = volumes[batch].clone()
            for i in range(len(batch)):
                axes = [axis for axis in (2, 3, 4) if rng.random() < 0.5]
                if axes:
                    x[i] = x[i].flip([axis - 1 for axis in axes])
            target = torch.as_tensor(labels[batch], dtype=torch.float32)
            loss = F.binary_cross_entropy_with_logits(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_auroc = roc_auc_score(labels[rows["val"]], _scores(model, volumes, rows["val"]))
        if val_auroc > best["val_auroc"]:
            state = {key: value.clone() for key, value in model.state_dict().items()}
            best = {"val_auroc": val_auroc, "epoch": epoch, "state": state}
    model.load_state_dict(best.pop("state"))
    figures = {s: roc_auc_score(labels[rows[s]], _scores(model, volumes, rows[s])) for s in ("test", "ood")}
    if selection is not None:
        figures["selection"] = roc_auc_score(selection[1], _scores(model, selection[0], np.arange(len(selection[1]))))
    return {
        "model": name,
        "seed": seed,
        "best_epoch": best["epoch"],
        "val_auroc": round(best["val_auroc"], 3),
        "id_auroc": round(figures["test"], 3),
        "ood_auroc": round(figures["ood"], 3),
        **({"selection_auroc": round(figures["selection"], 3)} if "selection" in figures else {}),
        "train_s": round(time.perf_counter() - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--finding", default="ich")
    parser.add_argument("--ood-sites", default="C")
    parser.add_argument("--test-fraction", type=float, default=0.45)  # the demo's split
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "backbone"])
    parser.add_argument("--selection-store", help="a second validation cohort's store (disjoint from the tests)")
    parser.add_argument("--selection-labels", help="its labels file")
    parser.add_argument("--backbone-overrides", nargs="*", default=[], help="e.g. model.depth=0")
    args = parser.parse_args()
    if (args.selection_store is None) != (args.selection_labels is None):
        parser.error("--selection-store and --selection-labels go together")
    config = CohortConfig(
        use_split_column=False,
        test_fraction=args.test_fraction,
        ood_sites=tuple(args.ood_sites.split(",")),
        findings=(args.finding,),
    )
    volumes, labels, split = _windowed_cohort(args.store, args.labels, config)
    selection = None
    if args.selection_store:
        selection_config = CohortConfig(use_split_column=False, findings=(args.finding,))
        selection_volumes, selection_labels, _ = _windowed_cohort(
            args.selection_store, args.selection_labels, selection_config
        )
        selection = (selection_volumes, selection_labels)
    for seed in args.seeds:
        for name in args.models:
            result = train_and_test(
                name, volumes, labels, split, seed, args.epochs, selection, tuple(args.backbone_overrides)
            )
            line = {"benchmark": "cnn_reference", "finding": args.finding, **result, "machine": platform.machine()}
            if name == "backbone" and args.backbone_overrides:
                line["backbone_overrides"] = args.backbone_overrides
            print(json.dumps(line), flush=True)


def _windowed_cohort(store_path: str, labels_spec: str, config: CohortConfig):
    """The labelled scans of a store: windowed volumes (N, 3, D, H, W), labels (N,) and splits (N,)."""
    store = Store(store_path)
    cohort = load_cohort(labels_spec, store.scan_ids, store_path, config, store_path)
    known = np.flatnonzero(~np.isnan(cohort.labels[:, 0]))
    hu = torch.stack([torch.from_numpy(store.read(cohort.scan_ids[i]).astype(np.float32)) for i in known])
    volumes = model_input(hu.unsqueeze(1), tuple(hu.shape[1:]))
    return volumes, cohort.labels[known, 0], cohort.split[known]


if __name__ == "__main__":
    main()
