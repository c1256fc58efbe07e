"""Detectors: the one home of a fitted model of findings that can be kept, shared and run on new scans.

Every fit of ``fmct probe`` (logistic) and ``fmct finetune`` is saved as a detector folder
(``OUT/fits/<budget>-seed<k>/``), safetensors and JSON only::

    config.json        flat: format, kind (probe | finetune), head, feature (a probe's feature set, as
                       :data:`fmct.models.encode.FEATURE_SETS` names it), findings, the backbone
                       reference, HU windows, model input size, the canonical grid and series selection
                       of the training store, per finding the calibration map and the operating points
                       chosen on the validation split, and provenance (data, labels, budget, seed,
                       test metrics with patient-level bootstrap 95 % CIs)
    head.safetensors   probe: per finding the standardisation (mean, scale) and the logistic regression
                       (coef, intercept) as (F, C) / (F,) tensors; finetune: the classifier head's state
    backbone/          a model folder (fmct.hub) when the fit changed the backbone (fine-tuned, or a
                       random init); otherwise config.json references the model folder by path and sha256
    README.md          the model card, generated from config.json

Scores are the head's logits. Each finding's calibration map, operating points and validation status are
set on the validation split by :mod:`fmct.eval.calibration` (the fit's side) and applied here: a
probability is :func:`calibrated_probability` of the score, and a scan is called positive at an operating
point when its probability is at least the point's ``threshold`` (a probability). A finding whose
validation split cannot tell it from chance has ``validation.validated`` false and its reason
(:func:`unvalidated_findings`).

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
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from fmct import __version__, hub
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.card import SYNTHETIC_DATASET, model_index_entry, render_card
from fmct.config import CanonicalConfig, IngestConfig, SelectionConfig, load_config, to_dict
from fmct.errors import CheckpointError, InputError
from fmct.fingerprint import file_sha256
from fmct.io.volume import Volume
from fmct.models.classifier import Classifier
from fmct.models.encode import FEATURE_SETS, scan_features
from fmct.models.vit3d import ViT3D
from fmct.models.windows import model_input
from fmct.paths import located, relative_to, without_machine_paths
from fmct.preprocess import canonical
from fmct.scans import read_one_scan
from fmct.store import Store

FORMAT = "fmct-detector"
VERSION = 2  # 2: thresholds on the probability, validation status per finding
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
CARD_FILE = "README.md"
BACKBONE_DIR = "backbone"
FITS_DIR = "fits"
PROBE_FEATURES = tuple(FEATURE_SETS)  # the feature sets a probe detector rebuilds from its backbone


# ---------------------------------------------------------------------------------- calibration
def calibrated_probability(calibration: dict, scores: np.ndarray | float) -> np.ndarray:
    """Float64 probabilities of logits ``scores`` under a finding's calibration map ``{"method", "a", "b"}``
    (:mod:`fmct.eval.calibration`): p = sigmoid(a * score + b), a > 0, so the map keeps the ranking."""
    z = calibration["a"] * np.asarray(scores, dtype=np.float64) + calibration["b"]
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid(z) without exp overflow


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
        return {
            "canonical": canonical,
            "selection": to_dict(config.selection),
            "grid_source": "the training store's ingest settings",
        }
    if not store.rows:
        raise InputError(f"{store.path}: an empty store has no grid")
    row = store.rows[0]
    spacing = {float(s) for s in row["store_spacing_mm"]}
    if len(spacing) != 1:
        raise InputError(f"{store.path}: the manifest's spacing {row['store_spacing_mm']} is not isotropic")
    canonical = CanonicalConfig(spacing_mm=spacing.pop(), shape=tuple(int(n) for n in row["store_shape"]))
    return {
        "canonical": to_dict(canonical),
        "selection": to_dict(SelectionConfig()),
        "grid_source": "the training store's manifest (shape, spacing); its other settings fmct's defaults",
    }


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
    :data:`fmct.models.encode.FEATURE_SETS` (``cls_mean_max``: ``cls`` | ``patch_mean`` | ``patch_max``);
    ``mean``, ``scale``, ``coef`` are (F, C) and ``intercept`` (F,).
    """

    def __init__(
        self,
        backbone: ViT3D,
        feature: str,
        mean: torch.Tensor,
        scale: torch.Tensor,
        coef: torch.Tensor,
        intercept: torch.Tensor,
    ):
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


class Detector(
    nn.Module, ModelHubMixin, library_name="fmct", license="apache-2.0", tags=["fmct", "head-ct", "3d-vit", "detector"]
):
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
        # Float64, as calibrated_probability: a probability at an operating point's threshold stays on its side.
        self.register_buffer(
            "calibration_a", torch.tensor([p["calibration"]["a"] for p in per_finding], dtype=torch.float64)
        )
        self.register_buffer(
            "calibration_b", torch.tensor([p["calibration"]["b"] for p in per_finding], dtype=torch.float64)
        )

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
        return model_input(hu, self.input_size, self.windows)

    def scores_of_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, F) of windowed volumes ``x`` (B, C, *input_size)."""
        return self.scorer(x).float()[:, self.output_index]

    def scores(self, hu: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, F) of canonical HU volumes (B, 1, X, Y, Z)."""
        return self.scores_of_input(self.model_input(hu))

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Float64 probabilities (B, F) of logits (B, F) under the calibration maps set on validation
        (:func:`calibrated_probability`)."""
        return torch.sigmoid(self.calibration_a * scores.double() + self.calibration_b)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Float32 calibrated probabilities (B, F) of canonical HU volumes (B, 1, X, Y, Z)."""
        return self.calibrated(self.scores(hu)).float()

    @torch.no_grad()
    def predict(
        self, scan: str | os.PathLike | Volume | np.ndarray | torch.Tensor, affine: np.ndarray | None = None
    ) -> dict[str, dict]:
        """What ``fmct predict`` says of one scan, per finding: ``probability``, ``score`` (the logit),
        ``positive_<point>`` (probability >= the point's threshold) per operating point, and ``validated``
        (False: its validation split could not tell it from chance, see :func:`unvalidated_findings`).

        ``scan``: a DICOM series folder or file, or a NIfTI file (read and resampled as ``fmct ingest``
        does, with the series selection the detector was trained with); a :class:`fmct.io.Volume`; or HU
        (X, Y, Z) as numpy or torch with its 4x4 voxel -> RAS mm ``affine`` (resampled as ingest does).
        Without an affine, an array is taken as already on the detector's canonical grid (a store's
        volume) and refused with :class:`InputError` when its shape is another.
        """
        hu = self.canonical_hu(scan, affine)
        device = self.calibration_a.device
        scores = self.scores(torch.from_numpy(hu)[None, None].to(device))
        probabilities = self.calibrated(scores)[0].cpu().numpy()
        not_validated = unvalidated_findings(self.config)
        results = {}
        for f, finding in enumerate(self.findings):
            probability = float(probabilities[f])
            results[finding] = {
                "probability": probability,
                "score": float(scores[0, f]),
                **{
                    f"positive_{name}": probability >= point["threshold"]
                    for name, point in self.operating_points(finding).items()
                },
                "validated": finding not in not_validated,
            }
        return results

    def canonical_hu(
        self, scan: str | os.PathLike | Volume | np.ndarray | torch.Tensor, affine: np.ndarray | None = None
    ) -> np.ndarray:
        """``scan`` (as :meth:`predict` takes it) as int16 HU on the detector's canonical grid (X, Y, Z)."""
        canonical_grid = canonical_config(self.config)
        if isinstance(scan, (str, os.PathLike)):
            return canonical(read_one_scan(scan, selection_config(self.config)), canonical_grid).hu
        if isinstance(scan, Volume):
            return canonical(scan, canonical_grid).hu
        hu = np.asarray(scan.detach().cpu() if isinstance(scan, torch.Tensor) else scan)
        if hu.ndim != 3:
            raise InputError(f"expected one HU volume (X, Y, Z), got shape {list(hu.shape)}")
        if affine is not None:
            return canonical(
                Volume(hu=hu.astype(np.float32), affine=np.asarray(affine, dtype=np.float64)), canonical_grid
            ).hu
        if tuple(hu.shape) != tuple(canonical_grid.shape):
            raise InputError(
                f"a volume of {list(hu.shape)} voxels is not on this detector's canonical grid "
                f"({list(canonical_grid.shape)} voxels of {canonical_grid.spacing_mm} mm, RAS); pass its "
                "affine to resample it, or a DICOM folder or NIfTI path"
            )
        return hu

    def operating_points(self, finding: str) -> dict[str, dict]:
        """The operating points of ``finding``: {name: {"threshold" (a probability), "score_threshold",
        ...}} (:func:`fmct.eval.calibration.calibrate_finding`)."""
        return self.config["per_finding"][finding]["operating_points"]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        fit: str | None = None,
        device: str | torch.device = "cpu",
        **hub_kwargs,
    ) -> "Detector":
        """The detector of a detector folder or a probe/finetune output folder (:func:`resolve_detector`;
        read here, never from the network); any other name is a Hugging Face Hub repo id that
        huggingface_hub downloads (a detector whose backbone lies inside it)."""
        if Path(name_or_path).exists():
            return load_detector(resolve_detector(name_or_path, fit), device)
        return super().from_pretrained(str(name_or_path), device=device, **hub_kwargs)

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, device: str | torch.device = "cpu", config: dict | None = None, **download
    ) -> "Detector":
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
        config["backbone"] = {
            "path": BACKBONE_DIR,
            "name": config["backbone"].get("name", ""),
            "shipped": False,
            "sha256": file_sha256(save_directory / BACKBONE_DIR / hub.WEIGHTS_FILE),
        }
        write_detector(save_directory, config, head)


# ---------------------------------------------------------------------------------- save, load
def write_detector(folder: str | os.PathLike, config: dict, head: dict[str, torch.Tensor]) -> Path:
    """Write a detector folder: ``head.safetensors``, the model card, then ``config.json`` (last: it marks
    the folder complete). ``config`` holds the keys :func:`load_detector` reads (see the module); a
    ``backbone/`` it names must be written first."""
    folder = Path(folder)
    config = {"format": FORMAT, "version": VERSION, "fmct_version": __version__, **config}
    backbone = config.get("backbone") or {}
    if Path(backbone.get("path", "")).is_absolute():  # a backbone by reference: found again from the folder
        config["backbone"] = {**backbone, "path": relative_to(backbone["path"], folder)}
    config = without_machine_paths(config)  # a detector folder is made to be shared
    tensors = {name: value.detach().cpu().contiguous() for name, value in head.items()}
    atomic_write_bytes(folder / HEAD_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CARD_FILE, detector_card(folder.name, config))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    return folder


def backbone_reference(source: hub.ModelSource) -> dict:
    """How a detector names a backbone it does not carry: the model folder's path, its shipped name
    (when it is one) and the sha256 of its weights."""
    shipped = hub.is_shipped(source.model_dir)
    return {
        "path": str(source.model_dir.resolve()),
        "name": source.model_dir.name if shipped else source.name,
        "sha256": source.sha256,
        "shipped": shipped,
    }


def read_detector_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a detector folder; :class:`CheckpointError` when it is not one."""
    path = Path(folder) / CONFIG_FILE
    config = hub.read_folder_config(folder, FORMAT, "a detector folder", "a detector")
    if config.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: detector version {config.get('version')} is not {VERSION}; made by another fmct"
        )
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
        raise CheckpointError(
            f"{path}: neither a detector folder nor a probe/finetune output with detectors in {FITS_DIR}/"
        )
    seed0 = [(folder, read_detector_config(folder)) for folder in fits]
    seed0 = [(folder, config) for folder, config in seed0 if config["provenance"]["seed"] == 0]
    if not seed0:
        raise CheckpointError(f"{path}: no detector of seed 0 in {FITS_DIR}/; name one with --fit")
    return max(seed0, key=lambda item: _labels_trained(item[1]))[0]


def _load_backbone(folder: Path, reference: dict, device: torch.device | str) -> ViT3D:
    """The backbone a detector names: its own ``backbone/``, or the referenced model folder (or shipped
    name), whose weights must still have the recorded sha256."""
    candidates = [located(reference["path"], folder)]
    if reference.get("shipped"):
        candidates.append(hub.SHIPPED_DIR / reference["name"])
    model_dir = next((c for c in candidates if (c / hub.WEIGHTS_FILE).is_file()), None)
    if model_dir is None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: its backbone {candidates[0]} is missing")
    if reference.get("sha256") and file_sha256(model_dir / hub.WEIGHTS_FILE) != reference["sha256"]:
        raise CheckpointError(
            f"{model_dir / hub.WEIGHTS_FILE}: not the backbone the detector {folder} was fitted on "
            f"(sha256 differs from the recorded one)"
        )
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
            scorer = ProbeScorer(
                backbone, config["feature"], head["mean"], head["scale"], head["coef"], head["intercept"]
            )
        else:
            scorer = Classifier(backbone, len(config["scorer_outputs"]), config["head"])
            missing, unexpected = scorer.load_state_dict(head, strict=False)
            if unexpected or [name for name in missing if not name.startswith("backbone.")]:
                raise KeyError(
                    f"head tensors do not match a {config['head']} head: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        detector = Detector(scorer, config)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: detector does not load: {str(error).splitlines()[0]}") from None
    return detector.to(device).eval()


# ------------------------------------------------------------------------------------ model card
def unvalidated_findings(config: dict) -> dict[str, str]:
    """{finding: reason} of a detector's findings that its validation split cannot tell from chance
    (:func:`fmct.eval.calibration.validation_status`); a detector written before fmct checked says so."""
    reasons = {}
    for finding in config["findings"]:
        validation = config["per_finding"][finding]["validation"]
        if "validated" not in validation:
            reasons[finding] = "not checked against chance (a detector written by an older fmct)"
        elif not validation["validated"]:
            reasons[finding] = validation["reason"]
    return reasons


def _interval(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "not estimable (no positive or no negative)"
    return f"{metrics[key]:.3f} [{metrics[f'{key}_lo']:.3f}, {metrics[f'{key}_hi']:.3f}]"


def _model_index(name: str, config: dict) -> list[dict]:
    """The Hub's model-index of a detector: test AUROC per finding and site group."""
    dataset = SYNTHETIC_DATASET if config["provenance"].get("synthetic") else config["provenance"]["store"]["name"]
    metrics = [
        {"type": "roc_auc", "name": f"{finding} AUROC, {group}", "value": round(m["auroc"], 4)}
        for finding in config["findings"]
        for group, m in config["provenance"]["metrics"].get(finding, {}).items()
        if "auroc" in m
    ]
    return (
        [model_index_entry(name, f"{', '.join(config['findings'])} detection on head CT", dataset, metrics)]
        if metrics
        else []
    )


def detector_card(name: str, config: dict) -> str:
    """The model card (Markdown, :func:`fmct.card.render_card`) of a detector folder, from its ``config.json``:
    model, data (and whether it was synthetic), recipe, metrics with CIs, operating points, calibration and
    validation status, intended use, limits."""
    provenance = config["provenance"]
    budget = provenance["budget"]
    budget_text = (
        f"{budget['label_fraction']:g} of the training labels"
        if budget.get("label_fraction") is not None
        else f"{budget['shots']} positive and {budget['shots']} negative scans per finding"
    )
    backbone = config["backbone"]
    backbone_text = (
        "its own `backbone/` (fine-tuned weights)"
        if backbone["path"] == BACKBONE_DIR
        else f"`{backbone.get('name') or backbone['path']}` (sha256 {backbone.get('sha256', '')[:12]}..., by reference)"
    )
    canonical = config["canonical"]
    synthetic = provenance.get("synthetic", False)
    model = (
        f"- {config['kind']} detector, head `{config['head']}`"
        + (f" on the `{config['feature']}` feature" if config.get("feature") else "")
        + f"; backbone {backbone_text}.\n"
        f"- Input: the scan resampled to fmct's canonical grid ({list(canonical['shape'])} voxels of "
        f"{canonical['spacing_mm']} mm, RAS, centred on the head; {config['grid_source']}), resized whole to "
        f"{config['input_size']} voxels, HU windows {config['windows_hu']} (level, width).\n"
        "- Output: per finding a logit and its probability (the calibration below); a scan is positive at an "
        "operating point when its probability is at least the point's threshold."
    )
    data = "\n".join(
        [
            (
                "- **Synthetic data**: the scans are `fmct synth` phantoms, not patients. Nothing here says how the "
                "detector does on real CT; not for clinical use."
                if synthetic
                else "- Data: real scans as ingested by fmct."
            ),
            f"- Labels: `{provenance['labels']['spec']}` (sha256 {provenance['labels']['sha256'][:12]}...); store "
            f"`{(provenance.get('store') or {}).get('name', 'not recorded')}` (manifest sha256 "
            f"{(provenance.get('store') or {}).get('manifest_sha256', '')[:12]}...).",
            f"- Scans per split: {provenance['scans_per_split']}; held-out sites (test only): "
            f"{provenance.get('ood_sites') or 'none'}.",
            f"- Trained on {budget_text}, seed {provenance['seed']}: "
            + ", ".join(f"{f} {n['pos']} positive / {n['neg']} negative" for f, n in provenance["n_train"].items())
            + ".",
        ]
    )
    metrics = [
        "| finding | group | scans (pos/neg) | AUROC | sensitivity @ spec90 | specificity @ spec90 "
        "| sensitivity @ spec95 | specificity @ spec95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for finding in config["findings"]:
        for group, m in provenance["metrics"].get(finding, {}).items():
            cells = [
                _interval(m, k)
                for k in (
                    "auroc",
                    "sensitivity_spec90",
                    "specificity_spec90",
                    "sensitivity_spec95",
                    "specificity_spec95",
                )
            ]
            metrics.append(
                f"| {finding} | {group} | {m['n_scans']} ({m['n_pos']}/{m['n_neg']}) | " + " | ".join(cells) + " |"
            )
    points = [
        "| finding | validation (pos/neg) | validation AUROC [95 % CI] | calibration | point "
        "| probability threshold | score threshold | val sensitivity | val specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for finding in config["findings"]:
        entry = config["per_finding"][finding]
        validation, calibration = entry["validation"], entry["calibration"]
        interval = f" [{validation['auroc_lo']:.3f}, {validation['auroc_hi']:.3f}]" if "auroc_lo" in validation else ""
        for point_name, point in entry["operating_points"].items():
            points.append(
                f"| {finding} | {validation['n_pos']}/{validation['n_neg']} | {validation['auroc']:.3f}{interval} | "
                f"{calibration['method']} | {point_name} | {point['threshold']:.4g} | "
                f"{point.get('score_threshold', float('nan')):.4g} | {point['val_sensitivity']:.3f} | "
                f"{point['val_specificity']:.3f} |"
            )
    warnings = [
        f"- **{finding} is not validated**: {reason}. Do not trust its probabilities; `fmct predict` warns, and "
        "refuses it with `--require-validated`."
        for finding, reason in unvalidated_findings(config).items()
    ]
    warnings += [
        f"- {finding}: {entry['calibration']['reason']}."
        for finding, entry in ((f, config["per_finding"][f]) for f in config["findings"])
        if entry["calibration"].get("reason")
    ]
    if config.get("left_out"):
        warnings.append(
            "- Findings trained but left out of this detector: "
            + "; ".join(f"{f}: {reason}" for f, reason in config["left_out"].items())
            + "."
        )
    limits = (
        "- Not a medical device; never use it for a clinical decision.\n"
        "- Validation and test splits are small: the CIs above are wide, and thresholds chosen on tens of validation "
        "scans move when the population or scanner changes; recalibrate on local scans.\n"
        "- Scans must be head CT that fmct's ingest accepts (axial series, the selection rules above); other anatomy "
        "or modalities give meaningless probabilities."
    )
    return render_card(
        name,
        f"A detector of {', '.join(config['findings'])} on head CT from `fmct {provenance['verb']}`"
        + (", trained and measured on **synthetic** scans only" if synthetic else "")
        + ". Run it with "
        "`fmct predict --model FOLDER --out OUT SCAN...`, export it with `fmct export`, or in Python "
        "`fmct.detector.Detector.from_pretrained(FOLDER).predict(scan)`.",
        [
            ("Model", model),
            ("Data", data),
            (
                "Recipe",
                f"`fmct {provenance['verb']}` with "
                + ", ".join(f"{k} {v}" for k, v in provenance["recipe"].items())
                + ".",
            ),
            ("Metrics (test splits, this fit; patient-level bootstrap 95 % CI)", "\n".join(metrics)),
            (
                "Operating points, calibration and validation (set on the validation split)",
                "\n".join(points) + ("\n\n" + "\n".join(warnings) if warnings else ""),
            ),
            (
                "Intended use",
                "Research on head CT detection with few labels: ranking scans, comparing recipes, looking at what a "
                "model attends to (`fmct predict --saliency`). Thresholds hold the validation split's specificity "
                "only on scans like it.",
            ),
            ("Limits", limits),
        ],
        tags=["head-ct", "medical-imaging", "detector"] + (["synthetic-data"] if synthetic else []),
        datasets=[SYNTHETIC_DATASET] if synthetic else None,
        base_model=backbone.get("name") or None,
        model_index=_model_index(name, config),
    )
