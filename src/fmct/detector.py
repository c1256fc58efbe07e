"""Detectors: the one home of a fitted model of findings that can be kept, shared and run on new scans.

Every fit of ``fmct probe`` (logistic) and ``fmct finetune`` is saved as a detector folder
(``OUT/fits/<budget>-seed<k>/``), safetensors and JSON only::

    config.json        flat: format, kind (probe | finetune), head, feature (a probe's feature set, as
                       :data:`fmct.eval.embeddings.FEATURE_SETS` names it), findings, the backbone
                       reference, HU windows, model input size, the canonical grid and series selection
                       of the training store, per finding the calibration map and the operating points
                       chosen on the validation split, and provenance (data, labels, budget, seed,
                       test metrics with patient-level bootstrap 95 % CIs)
    head.safetensors   probe: per finding the standardisation (mean, scale) and the logistic regression
                       (coef, intercept) as (F, C) / (F,) tensors; finetune: the classifier head's state
    backbone/          a model folder (fmct.hub) when the fit changed the backbone (fine-tuned, or a
                       random init); otherwise config.json references the model folder by path and sha256
    README.md          the model card, generated from config.json

Scores are the head's logits. **Operating points**: for each finding, the lowest score threshold whose
specificity on the validation split is at least 90 % (``spec90``) and 95 % (``spec95``); a scan is
called positive when ``score >= threshold``. **Calibration**: Platt scaling, p = sigmoid(a * score + b),
fitted on the validation split by maximum likelihood with Platt's smoothed targets ((N+ + 1) / (N+ + 2)
and 1 / (N- + 2)) and a >= 0. Platt rather than isotonic regression because validation splits are small
(tens of scans, a handful of positives): two parameters do not overfit them, the map is monotone so it
keeps the ranking (and so every AUROC and every threshold), and the smoothed targets keep a perfectly
separated validation split from sending the slope to infinity (probabilities of exactly 0 or 1).

k-NN probes are evaluated but never saved: a k-NN detector would have to carry the features of every
training scan, a derived copy of the training patients' data. The floors (random-init embeddings, the
HU histogram) are baselines, not detectors, and are not saved either.

:class:`Detector` runs one: canonical int16/float HU volumes (B, 1, X, Y, Z) in, calibrated
probabilities (B, F) out. ``Detector.from_pretrained(path)`` (huggingface_hub's ``ModelHubMixin``)
accepts a detector folder or the output folder of either verb (:func:`resolve_detector`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from scipy import optimize
from torch import nn

from fmct import __version__, hub
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.config import CanonicalConfig, IngestConfig, SelectionConfig, load_config, to_dict
from fmct.data.augment import embed_transform
from fmct.errors import CheckpointError, InputError
from fmct.eval.cohort import Cohort
from fmct.eval.embeddings import FEATURE_SETS
from fmct.eval.metrics import auroc, operating_point_at_specificity
from fmct.fingerprint import file_sha256
from fmct.models.classifier import Classifier
from fmct.models.encode import scan_features
from fmct.models.vit3d import ViT3D
from fmct.store import Store

FORMAT = "fmct-detector"
VERSION = 1
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
CARD_FILE = "README.md"
BACKBONE_DIR = "backbone"
FITS_DIR = "fits"
OPERATING_POINTS = {"spec90": 0.90, "spec95": 0.95}  # name -> specificity reached on the validation split
PROBE_FEATURES = tuple(FEATURE_SETS)  # the feature sets a probe detector rebuilds from its backbone


# ----------------------------------------------------------------------- calibration, thresholds
def fit_platt(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Platt scaling of ``scores`` (N,) against 0/1 ``labels``: ``{"method": "platt", "a", "b"}`` with
    p = sigmoid(a * score + b), maximum likelihood on Platt's smoothed targets, a >= 0 (see the module)."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = float(np.sum(labels == 1)), float(np.sum(labels == 0))
    target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    centre, spread = float(np.mean(scores)), float(np.std(scores)) or 1.0  # fit on standardised scores: well conditioned

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * (scores - centre) / spread + params[1]
        p = 1.0 / (1.0 + np.exp(-z))
        # Cross-entropy written with logaddexp, finite for any z.
        value = np.sum(target * np.logaddexp(0.0, -z) + (1 - target) * np.logaddexp(0.0, z))
        residual = p - target
        return float(value), np.array([np.sum(residual * (scores - centre) / spread), np.sum(residual)])

    prior = np.log((n_pos + 1) / (n_neg + 1))
    result = optimize.minimize(loss, x0=np.array([1.0, prior]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    slope, offset = result.x
    a = float(slope / spread)
    return {"method": "platt", "a": a, "b": float(offset - a * centre)}


def platt_probability(calibration: dict, scores: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of ``scores`` under a map of :func:`fit_platt`."""
    return 1.0 / (1.0 + np.exp(-(calibration["a"] * np.asarray(scores, dtype=np.float64) + calibration["b"])))


def calibrate_finding(labels: np.ndarray, scores: np.ndarray) -> dict:
    """What a detector keeps of one finding from its validation scans (0/1 ``labels``, ``scores``): the
    calibration map, the operating points of :data:`OPERATING_POINTS` (score threshold, its calibrated
    probability, and the sensitivity and specificity reached on validation) and the validation counts
    and AUROC. Raises ValueError when the validation scans lack a positive or a negative."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not (np.any(labels == 1) and np.any(labels == 0)):
        raise ValueError("the validation split needs a positive and a negative to set thresholds and calibration")
    calibration = fit_platt(labels, scores)
    points = {}
    for name, specificity in OPERATING_POINTS.items():
        point = {key: float(value) for key, value in operating_point_at_specificity(labels, scores, specificity).items()}
        # Above every score when even the highest one is too many false positives: nothing is called positive.
        threshold = point["threshold"] if np.isfinite(point["threshold"]) else float(np.nextafter(scores.max(), np.inf))
        points[name] = {"specificity_target": specificity, "threshold": threshold,
                        "probability": float(platt_probability(calibration, threshold)),
                        "val_sensitivity": point["sensitivity"], "val_specificity": point["specificity"]}
    return {"calibration": calibration, "operating_points": points,
            "validation": {"n_pos": int(np.sum(labels == 1)), "n_neg": int(np.sum(labels == 0)),
                           "auroc": float(auroc(labels, scores))}}


@dataclass
class FindingFit:
    """One finding of one fit, as cohort rows with the fit's scores: its training scans, its validation
    scans (thresholds and calibration are set on them) and its evaluated (test and ood) scans."""

    train_rows: np.ndarray
    val_rows: np.ndarray
    val_scores: np.ndarray
    eval_rows: np.ndarray
    eval_scores: np.ndarray


def summarise_fit(cohort: Cohort, fits: dict[int, FindingFit], n_bootstrap: int = 1000) -> dict:
    """The per-finding part of a detector's ``config.json`` for the fits of cohort findings ``fits``:
    ``per_finding`` (calibration, operating points, validation counts), ``left_out`` ({finding: why} for
    a finding whose validation split lacks a class), and the provenance's ``n_train`` and ``metrics``
    (:meth:`Cohort.fit_metrics` at the operating points)."""
    per_finding, left_out, n_train, metrics = {}, {}, {}, {}
    for f, fit in fits.items():
        name, labels = cohort.findings[f], cohort.labels[:, f]
        n_train[name] = {"pos": int(np.sum(labels[fit.train_rows] == 1)), "neg": int(np.sum(labels[fit.train_rows] == 0))}
        try:
            entry = calibrate_finding(labels[fit.val_rows], fit.val_scores)
        except ValueError as error:
            left_out[name] = str(error)
            continue
        per_finding[name] = entry
        thresholds = {point: values["threshold"] for point, values in entry["operating_points"].items()}
        metrics[name] = cohort.fit_metrics(f, fit.eval_rows, np.asarray(fit.eval_scores, dtype=np.float64), thresholds, n_bootstrap)
    return {"per_finding": per_finding, "left_out": left_out, "n_train": n_train, "metrics": metrics}


def prediction_columns(summary: dict, finding: str, score: float) -> dict:
    """The optional columns of a ``predictions.csv`` row (:data:`fmct.eval.evaluate.OPTIONAL_COLUMNS`) of a
    fit's ``score`` of ``finding``, from :func:`summarise_fit`: the calibrated ``probability`` and the
    validation thresholds ``threshold_spec90`` / ``threshold_spec95`` (on the score); none when the
    finding could not be calibrated."""
    entry = summary["per_finding"].get(finding)
    if entry is None:
        return {}
    return {"probability": float(platt_probability(entry["calibration"], score)),
            **{f"threshold_{name}": point["threshold"] for name, point in entry["operating_points"].items()}}


# -------------------------------------------------------------------------------- the input grid
def store_grid(store_path: str | os.PathLike) -> dict:
    """The input a detector trained on this store expects: ``{"canonical", "selection", "grid_source"}``.

    The grid from the store's ``store.json`` (the grid ingest claimed it for), else its ``config.yaml``;
    the selection rules from ``config.yaml``. A store written without them (by hand) gives its manifest's
    shape and spacing with fmct's default centring and selection.
    """
    store = Store(store_path)
    identity, config_path = store.path / "store.json", store.path / "config.yaml"
    if config_path.exists():
        config = load_config(IngestConfig, config_path)
        canonical = to_dict(config.canonical)
        if identity.exists():
            canonical = {**canonical, **json.loads(identity.read_text()).get("canonical", {})}
        return {"canonical": canonical, "selection": to_dict(config.selection),
                "grid_source": "the training store's ingest settings"}
    if not store.rows:
        raise InputError(f"{store.path}: an empty store has no grid")
    row = store.rows[0]
    spacing = {float(s) for s in row["store_spacing_mm"]}
    if len(spacing) != 1:
        raise InputError(f"{store.path}: the manifest's spacing {row['store_spacing_mm']} is not isotropic")
    canonical = CanonicalConfig(spacing_mm=spacing.pop(), shape=tuple(int(n) for n in row["store_shape"]))
    return {"canonical": to_dict(canonical), "selection": to_dict(SelectionConfig()),
            "grid_source": "the training store's manifest (shape, spacing); its other settings fmct's defaults"}


def canonical_config(config: dict) -> CanonicalConfig:
    """The :class:`CanonicalConfig` a detector's ``config.json`` records."""
    canonical = dict(config["canonical"])
    canonical["shape"] = tuple(canonical["shape"])
    return CanonicalConfig(**canonical)


def selection_config(config: dict) -> SelectionConfig:
    """The :class:`SelectionConfig` a detector's ``config.json`` records."""
    selection = dict(config["selection"])
    selection["thickness_range_mm"] = tuple(selection["thickness_range_mm"])
    return SelectionConfig(**selection)


# --------------------------------------------------------------------------------------- scorers
class ProbeScorer(nn.Module):
    """A frozen backbone and one logistic regression per finding on its standardised features:
    windowed volumes (B, C, D, H, W) -> scores (B, F), F = rows of ``coef``.

    ``feature`` is a feature set of :data:`PROBE_FEATURES`: the backbone's pooled features
    (:func:`fmct.models.encode.scan_features`, as ``fmct embed`` writes them) side by side in the order of
    :data:`fmct.eval.embeddings.FEATURE_SETS` (``cls_mean_max``: ``cls`` | ``patch_mean`` | ``patch_max``);
    ``mean``, ``scale``, ``coef`` are (F, C) and ``intercept`` (F,).
    """

    def __init__(self, backbone: ViT3D, feature: str, mean: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                 intercept: torch.Tensor):
        super().__init__()
        if feature not in PROBE_FEATURES:
            raise ValueError(f"probe feature {feature!r}: choose {', '.join(PROBE_FEATURES)}")
        self.backbone, self.feature = backbone, feature
        for name, value in (("mean", mean), ("scale", scale), ("coef", coef), ("intercept", intercept)):
            self.register_buffer(name, value.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = scan_features(self.backbone.forward_features(x))
        features = torch.cat([pooled[name] for name in FEATURE_SETS[self.feature]], dim=1)
        standardised = (features[:, None, :] - self.mean) / self.scale  # (B, F, C)
        return (standardised * self.coef).sum(dim=-1) + self.intercept


class Detector(nn.Module, ModelHubMixin, library_name="fmct", license="apache-2.0",
               tags=["fmct", "head-ct", "3d-vit", "detector"]):
    """A detector: canonical HU volumes (B, 1, X, Y, Z), any dtype, on the detector's device ->
    calibrated probabilities (B, F) for :attr:`findings`.

    ``scorer`` maps windowed volumes (B, C, *input_size) to logits, one column
    per name of ``config["scorer_outputs"]``; ``config`` is the detector's ``config.json``.
    """

    def __init__(self, scorer: nn.Module, config: dict):
        super().__init__()
        self.scorer, self.config = scorer, config
        findings = config["findings"]
        outputs = config["scorer_outputs"]
        self.register_buffer("output_index", torch.tensor([outputs.index(f) for f in findings], dtype=torch.long))
        per_finding = [config["per_finding"][f] for f in findings]
        self.register_buffer("platt_a", torch.tensor([p["calibration"]["a"] for p in per_finding], dtype=torch.float32))
        self.register_buffer("platt_b", torch.tensor([p["calibration"]["b"] for p in per_finding], dtype=torch.float32))

    @property
    def findings(self) -> list[str]:
        return list(self.config["findings"])

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The backbone's input (D, H, W) voxels: every canonical volume is resized whole to it."""
        return tuple(self.config["input_size"])

    @property
    def windows(self) -> list[tuple[float, float]]:
        """The (level, width) HU windows of the input channels."""
        return [(float(level), float(width)) for level, width in self.config["windows_hu"]]

    @property
    def backbone(self) -> ViT3D:
        return self.scorer.backbone

    def model_input(self, hu: torch.Tensor) -> torch.Tensor:
        """Windowed float32 volumes (B, C, *input_size) in [0, 1] of canonical HU volumes (B, 1, X, Y, Z)."""
        return embed_transform(hu, self.input_size, self.windows)

    def scores_of_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, F) of windowed volumes ``x`` (B, C, *input_size)."""
        return self.scorer(x).float()[:, self.output_index]

    def scores(self, hu: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, F) of canonical HU volumes (B, 1, X, Y, Z)."""
        return self.scores_of_input(self.model_input(hu))

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, F) of logits (B, F) under the Platt maps fitted on validation."""
        return torch.sigmoid(self.platt_a * scores + self.platt_b)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (B, F) of canonical HU volumes (B, 1, X, Y, Z)."""
        return self.calibrated(self.scores(hu))

    def operating_points(self, finding: str) -> dict[str, dict]:
        """The operating points of ``finding``: {name: {"threshold" (score), "probability", ...}}."""
        return self.config["per_finding"][finding]["operating_points"]

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, fit: str | None = None,
                        device: str | torch.device = "cpu", **hub_kwargs) -> "Detector":
        """The detector of a detector folder or a probe/finetune output folder (:func:`resolve_detector`;
        read here, never from the network); any other name is a Hugging Face Hub repo id that
        huggingface_hub downloads (a detector whose backbone lies inside it)."""
        if Path(name_or_path).exists():
            return load_detector(resolve_detector(name_or_path, fit), device)
        return super().from_pretrained(str(name_or_path), device=device, **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, device: str | torch.device = "cpu", config: dict | None = None,
                         **download) -> "Detector":
        # A Hub repo id: fetch the folder, then read it like a local one (``config``, the parsed
        # config.json the mixin passes along, is read and checked by load_detector itself).
        return load_detector(hub.hub_snapshot(model_id, **download), device)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        config = dict(self.config)
        if isinstance(self.scorer, ProbeScorer):
            head = {name: getattr(self.scorer, name).cpu() for name in ("mean", "scale", "coef", "intercept")}
        else:
            head = {k: v for k, v in self.scorer.state_dict().items() if not k.startswith("backbone.")}
        # A saved (or pushed) detector carries its backbone, so the folder works anywhere on its own.
        hub.save(self.backbone, save_directory / BACKBONE_DIR, extra=getattr(self.backbone, "hub_extra", {}))
        config["backbone"] = {"path": BACKBONE_DIR, "name": config["backbone"].get("name", ""), "shipped": False,
                              "sha256": file_sha256(save_directory / BACKBONE_DIR / hub.WEIGHTS_FILE)}
        write_detector(save_directory, config, head)


# ---------------------------------------------------------------------------------- save, load
def write_detector(folder: str | os.PathLike, config: dict, head: dict[str, torch.Tensor]) -> Path:
    """Write a detector folder: ``head.safetensors``, the model card, then ``config.json`` (last: it marks
    the folder complete). ``config`` holds the keys :func:`load_detector` reads (see the module); a
    ``backbone/`` it names must be written first."""
    folder = Path(folder)
    config = {"format": FORMAT, "version": VERSION, "fmct_version": __version__, **config}
    tensors = {name: value.detach().cpu().contiguous() for name, value in head.items()}
    atomic_write_bytes(folder / HEAD_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CARD_FILE, detector_card(folder.name, config))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    return folder


def backbone_reference(source: hub.ModelSource) -> dict:
    """How a detector names a backbone it does not carry: the model folder's path, its shipped name
    (when it is one) and the sha256 of its weights."""
    shipped = source.model_dir.resolve().parent == hub.SHIPPED_DIR.resolve()
    return {"path": str(source.model_dir.resolve()), "name": source.model_dir.name if shipped else source.name,
            "sha256": source.sha256, "shipped": shipped}


def read_detector_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a detector folder; :class:`CheckpointError` when it is not one."""
    path = Path(folder) / CONFIG_FILE
    config = hub.read_folder_config(folder, FORMAT, "a detector folder", "a detector")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path}: detector version {config.get('version')} is not {VERSION}; made by another fmct")
    return config


def is_detector(folder: str | os.PathLike) -> bool:
    """True for a folder whose ``config.json`` is a detector's."""
    try:
        read_detector_config(folder)
    except CheckpointError:
        return False
    return True


def _labels_trained(config: dict) -> int:
    return sum(n["pos"] + n["neg"] for n in config["provenance"]["n_train"].values())


def resolve_detector(path: str | os.PathLike, fit: str | None = None) -> Path:
    """The detector folder behind ``path``: a detector folder itself, or the output folder of ``fmct
    probe`` / ``fmct finetune``, where ``fit`` names one of ``fits/`` (e.g. ``fraction1-seed0``) and
    without it the seed-0 fit trained on the most labels is taken. :class:`CheckpointError` otherwise."""
    path = Path(path)
    if fit is None and is_detector(path):
        return path
    fits = sorted(folder for folder in (path / FITS_DIR).glob("*") if is_detector(folder))
    if fit is not None:
        if path.name == fit and is_detector(path):
            return path
        if (path / FITS_DIR / fit) in fits:
            return path / FITS_DIR / fit
        names = ", ".join(folder.name for folder in fits) or "none"
        raise CheckpointError(f"{path}: no detector fit {fit!r} (fits: {names})")
    if not fits:
        raise CheckpointError(f"{path}: neither a detector folder nor a probe/finetune output with detectors in {FITS_DIR}/")
    seed0 = [(folder, read_detector_config(folder)) for folder in fits]
    seed0 = [(folder, config) for folder, config in seed0 if config["provenance"]["seed"] == 0]
    if not seed0:
        raise CheckpointError(f"{path}: no detector of seed 0 in {FITS_DIR}/; name one with --fit")
    return max(seed0, key=lambda item: _labels_trained(item[1]))[0]


def _load_backbone(folder: Path, reference: dict, device: torch.device | str) -> ViT3D:
    """The backbone a detector names: its own ``backbone/``, or the referenced model folder (or shipped
    name), whose weights must still have the recorded sha256."""
    candidates = [folder / reference["path"]] if reference["path"] == BACKBONE_DIR else [Path(reference["path"])]
    if reference.get("shipped"):
        candidates.append(hub.SHIPPED_DIR / reference["name"])
    model_dir = next((c for c in candidates if (c / hub.WEIGHTS_FILE).is_file()), None)
    if model_dir is None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: its backbone {candidates[0]} is missing")
    if reference.get("sha256") and file_sha256(model_dir / hub.WEIGHTS_FILE) != reference["sha256"]:
        raise CheckpointError(f"{model_dir / hub.WEIGHTS_FILE}: not the backbone the detector {folder} was fitted on "
                              f"(sha256 differs from the recorded one)")
    return hub.load(model_dir, device)


def load_detector(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """The :class:`Detector` saved in ``folder``, on ``device``, in eval mode. Raises :class:`CheckpointError`."""
    folder = Path(folder)
    config = read_detector_config(folder)
    try:
        head = load_file(folder / HEAD_FILE)
    except FileNotFoundError:
        raise CheckpointError(f"{folder / HEAD_FILE}: missing") from None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{folder / HEAD_FILE}: unreadable safetensors file: {error}") from None
    backbone = _load_backbone(folder, config["backbone"], "cpu")
    try:
        if config["kind"] == "probe":
            scorer = ProbeScorer(backbone, config["feature"], head["mean"], head["scale"], head["coef"], head["intercept"])
        else:
            scorer = Classifier(backbone, len(config["scorer_outputs"]), config["head"])
            missing, unexpected = scorer.load_state_dict(head, strict=False)
            if unexpected or [name for name in missing if not name.startswith("backbone.")]:
                raise KeyError(f"head tensors do not match a {config['head']} head: missing {missing[:3]}, unexpected {unexpected[:3]}")
        detector = Detector(scorer, config)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: detector does not load: {str(error).splitlines()[0]}") from None
    return detector.to(device).eval()


# ------------------------------------------------------------------------------------ model card
def _interval(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "not estimable (no positive or no negative)"
    return f"{metrics[key]:.3f} [{metrics[f'{key}_lo']:.3f}, {metrics[f'{key}_hi']:.3f}]"


def detector_card(name: str, config: dict) -> str:
    """The model card (Markdown) of a detector folder, from its ``config.json``: model, data, recipe,
    metrics with CIs, operating points and calibration, intended use, limits."""
    provenance = config["provenance"]
    budget = provenance["budget"]
    budget_text = (f"{budget['label_fraction']:g} of the training labels" if budget.get("label_fraction") is not None
                   else f"{budget['shots']} positive and {budget['shots']} negative scans per finding")
    backbone = config["backbone"]
    backbone_text = ("its own `backbone/` (fine-tuned weights)" if backbone["path"] == BACKBONE_DIR
                     else f"`{backbone.get('name') or backbone['path']}` (sha256 {backbone.get('sha256', '')[:12]}..., by reference)")
    canonical = config["canonical"]
    lines = [
        "---", "library_name: fmct", "license: apache-2.0", "tags: [fmct, head-ct, detector, medical-imaging]", "---",
        f"# {name}", "",
        f"A detector of {', '.join(config['findings'])} on head CT from `fmct {provenance['verb']}`. Run it with "
        f"`fmct predict --model FOLDER --out OUT SCAN...`, export it with `fmct export`, or load it in Python with "
        "`fmct.detector.Detector.from_pretrained(FOLDER)`.", "",
        "## Model",
        f"- {config['kind']} detector, head `{config['head']}`" + (f" on the `{config['feature']}` feature" if config.get("feature") else "")
        + f"; backbone {backbone_text}.",
        f"- Input: the scan resampled to fmct's canonical grid ({list(canonical['shape'])} voxels of {canonical['spacing_mm']} mm, "
        f"RAS, centred on the head; {config['grid_source']}), resized whole to {config['input_size']} voxels, HU windows "
        f"{config['windows_hu']} (level, width).",
        "- Output: per finding a logit and its calibrated probability (Platt scaling fitted on the validation split).", "",
        "## Data",
        f"- Labels: `{Path(provenance['labels']['spec']).name}` (sha256 {provenance['labels']['sha256'][:12]}...); store "
        f"`{provenance.get('store') or 'not recorded'}`.",
        f"- Scans per split: {provenance['scans_per_split']}; held-out sites (test only): {provenance.get('ood_sites') or 'none'}.",
        f"- Trained on {budget_text}, seed {provenance['seed']}: "
        + ", ".join(f"{f} {n['pos']} positive / {n['neg']} negative" for f, n in provenance["n_train"].items()) + ".", "",
        "## Recipe",
        f"`fmct {provenance['verb']}` with " + ", ".join(f"{k} {v}" for k, v in provenance["recipe"].items()) + ".", "",
        "## Metrics (test splits, this fit; patient-level bootstrap 95 % CI)", "",
        "| finding | group | scans (pos/neg) | AUROC | sensitivity @ spec90 | specificity @ spec90 | sensitivity @ spec95 | specificity @ spec95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for finding in config["findings"]:
        for group, m in provenance["metrics"].get(finding, {}).items():
            cells = [_interval(m, k) for k in ("auroc", "sensitivity_spec90", "specificity_spec90", "sensitivity_spec95", "specificity_spec95")]
            lines.append(f"| {finding} | {group} | {m['n_scans']} ({m['n_pos']}/{m['n_neg']}) | " + " | ".join(cells) + " |")
    lines += ["", "## Operating points and calibration (chosen on the validation split)", "",
              "| finding | validation (pos/neg) | validation AUROC | point | score threshold | probability threshold | val sensitivity | val specificity |",
              "|---|---|---|---|---|---|---|---|"]
    for finding in config["findings"]:
        entry = config["per_finding"][finding]
        validation = entry["validation"]
        for point_name, point in entry["operating_points"].items():
            lines.append(f"| {finding} | {validation['n_pos']}/{validation['n_neg']} | {validation['auroc']:.3f} | {point_name} | "
                         f"{point['threshold']:.4g} | {point['probability']:.3f} | {point['val_sensitivity']:.3f} | {point['val_specificity']:.3f} |")
    if config.get("left_out"):
        lines += ["", "Findings trained but left out of this detector: "
                  + "; ".join(f"{f}: {reason}" for f, reason in config["left_out"].items()) + "."]
    lines += ["", "## Intended use",
              "Research on head CT detection with few labels: ranking scans, comparing recipes, looking at what a model "
              "attends to (`fmct predict --saliency`). Thresholds hold the validation split's specificity only on scans "
              "like it.", "",
              "## Limits",
              "- Not a medical device; never use it for a clinical decision.",
              "- Validation and test splits are small: the CIs above are wide, and thresholds chosen on tens of "
              "validation scans move when the population or scanner changes; recalibrate on local scans.",
              "- Scans must be head CT that fmct's ingest accepts (axial series, the selection rules above); other "
              "anatomy or modalities give meaningless probabilities.",
              ""]
    return "\n".join(lines)
