"""Model folders, the one home of everything about them: find one (:func:`resolve_model_dir`, shipped
names included), read its architecture, HU windows and name, fingerprint, load and save it, and build a
backbone from a folder or as the random-init floor of one (:func:`resolve_model`).

A folder holds the weights of a :class:`~fmct.models.ViT3D` as ``model.safetensors``, its architecture
plus free metadata as a flat ``config.json`` (Hugging Face's convention: the fields at the top level) and
a generated model card (``README.md``). Nothing is unpickled, so a folder from anyone is safe to load.
:class:`ViT3DModel` gives it Hugging Face's ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``
(huggingface_hub's ``ModelHubMixin``); a local folder, run or shipped name never touches the network.

``config.json`` (version 2)::

    {"format": "fmct-vit3d", "version": 2,
     ...the ViT3DConfig fields (size, img_size, patch_size, embed_dim, ...)...,
     ...whatever the writer passed as extra: windows (HU), training run, step...}

Version 1 folders (``{"format", "version": 1, "config": {...}, "extra": {...}}``, e.g. the shipped
``fmct-synth-tiny``) are read as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.card import render_card
from fmct.devices import unwrap
from fmct.errors import CheckpointError, ConfigError, UsageError
from fmct.fingerprint import file_sha256
from fmct.models.vit3d import ViT3D, ViT3DConfig
from fmct.models.windows import DEFAULT_WINDOWS, hu_batch, model_input
from fmct.paths import without_machine_paths

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "fmct-vit3d"
VERSION = 2
_ARCHITECTURE_FIELDS = tuple(field.name for field in dataclasses.fields(ViT3DConfig))


# Checkpoints shipped inside the package, loadable by name (``--model fmct-synth-tiny``): each folder
# holds model.safetensors, config.json, the run's log.jsonl and a model card (README.md).
SHIPPED_DIR = Path(__file__).parent / "weights"


def is_shipped(model_dir: str | os.PathLike) -> bool:
    """True for a model folder shipped inside the package (named by its name, never by a path)."""
    return Path(model_dir).resolve().parent == SHIPPED_DIR.resolve()


def shipped_models() -> list[str]:
    """Names of the checkpoints shipped inside the package."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file()) if SHIPPED_DIR.is_dir() else []


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder behind ``path``: a folder holding ``config.json`` and ``model.safetensors`` is itself;
    a pretraining run folder maps to its ``backbone/``; a name of :func:`shipped_models` that is not a
    folder here maps to the shipped checkpoint. Anything else raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists() and str(path) in shipped_models():
        path = SHIPPED_DIR / str(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path
    backbone = path / "backbone"
    if (backbone / CONFIG_FILE).is_file() and (backbone / WEIGHTS_FILE).is_file():
        return backbone
    if backbone.is_dir():
        raise CheckpointError(
            f"{backbone}: pretraining run without a finished backbone ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    names = ", ".join(shipped_models()) or "none"
    raise CheckpointError(
        f"{path}: not a model folder ({CONFIG_FILE} + {WEIGHTS_FILE}), a pretraining run (backbone/) "
        f"nor a shipped model ({names})"
    )


TRAINING_LOG = "log.jsonl"


def training_log(path: str | os.PathLike) -> Path:
    """The pretraining log (log.jsonl) behind ``path``: a pretraining run folder's own, or the one kept
    in a model folder (shipped checkpoints carry theirs); for ``RUN/backbone``, the run's. Raises
    :class:`CheckpointError` when there is none."""
    path = Path(path)
    if (path / TRAINING_LOG).is_file():
        return path / TRAINING_LOG
    model_dir = resolve_model_dir(path)
    for folder in (model_dir, model_dir.parent if model_dir.name == "backbone" else None):
        if folder is not None and (folder / TRAINING_LOG).is_file():
            return folder / TRAINING_LOG
    raise CheckpointError(f"{path}: no pretraining log ({TRAINING_LOG}) in the run or model folder")


def save(model: ViT3D, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model``'s weights, flat config and model card to ``folder`` (created if needed); return the folder.

    ``model`` may be wrapped by DDP or ``torch.compile``. With FSDP, gather a full state first and
    call this on one rank. ``extra`` must be JSON-serialisable (e.g. the HU windows the model was trained
    on) and may not reuse an architecture field's name. Each file is written atomically; the weights go
    first so that ``config.json`` marks a complete folder.
    """
    model = unwrap(model)
    if not isinstance(model, ViT3D):
        raise TypeError(f"hub.save expects a ViT3D, got {type(model).__name__}")
    folder = Path(folder)
    extra = without_machine_paths(dict(extra or {}))  # a model folder is made to be shared
    clashes = sorted(set(extra) & {"format", "version", *_ARCHITECTURE_FIELDS})
    if clashes:
        raise ValueError(f"hub.save: extra metadata may not use the config.json keys {', '.join(clashes)}")
    try:
        config_text = json.dumps(
            {"format": FORMAT, "version": VERSION, **dataclasses.asdict(model.config), **extra}, indent=2
        )
    except TypeError as error:
        raise TypeError(f"hub.save: extra metadata is not JSON-serialisable: {error}") from None
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CARD_FILE, model_card(model_name(folder.resolve()), model.config, extra))
    atomic_write_text(folder / CONFIG_FILE, config_text + "\n")
    return folder


def model_card(name: str, config: ViT3DConfig, extra: dict) -> str:
    """The model card (Markdown, :func:`fmct.card.render_card`) of a backbone folder, from its architecture
    and recorded ``extra``: model, data, recipe, metrics, intended use and limits."""
    windows = extra.get("windows") or [list(w) for w in DEFAULT_WINDOWS]
    finetuned_from = extra.get("finetuned_from") or {}
    if finetuned_from:
        data = (
            f"Fine-tuned on labelled scans by `fmct finetune` from `{finetuned_from.get('name', '?')}` (sha256 "
            f"{finetuned_from.get('checkpoint_sha256') or 'none: random init'}); the detector folder around it "
            "records the labels, splits and budget."
        )
        recipe = "Part of a detector fitted by `fmct finetune`: see its `config.json` and model card."
    else:
        store = extra.get("store")
        name = store.get("name") if isinstance(store, dict) else store  # older folders recorded a path
        data = f"Pretrained by `fmct pretrain` on the store `{name}`." if name else "Not recorded."
        recipe = (
            ", ".join(f"{key} {extra[key]}" for key in ("method", "step", "config_sha256") if key in extra)
            or "Not recorded."
        )
    model = (
        f"- ViT3D {config.size}: {config.depth} blocks, width {config.embed_dim}, {config.n_heads} heads, patch "
        f"{list(config.patch_size)} voxels, input {list(config.img_size)} voxels, "
        f"{config.n_registers} register token(s).\n"
        f"- Input channels: the HU windows {windows} (level, width) of the canonical volume (RAS) resized whole to the "
        "input (`ViT3DModel.preprocess`)."
    )
    return render_card(
        name,
        "A 3D ViT backbone for head CT from fmct. Load it with `fmct.hub.ViT3DModel.from_pretrained(FOLDER)` (no "
        "network for a local folder), or pass the folder as `--model` to `fmct embed` and `fmct finetune`.",
        [
            ("Model", model),
            ("Data", data),
            ("Recipe", recipe),
            (
                "Metrics",
                "A backbone has no metrics of its own: `fmct probe` and `fmct finetune` measure what detectors made "
                "from it find (AUROC with patient-level bootstrap 95 % CIs), and their detector folders' model cards "
                "state them.",
            ),
            ("Intended use", "Research: features for probes and a starting point for fine-tuning in fmct's pipeline."),
            (
                "Limits",
                "Not a medical device and not validated for any clinical decision. Features carry whatever the "
                "pretraining data held; measure a detector made from it on your own scans before trusting it.",
            ),
        ],
        tags=["head-ct", "3d-vit", "medical-imaging", "backbone"],
        base_model=finetuned_from.get("name") or None,
    )


def read_folder_config(folder: str | os.PathLike, format_name: str, folder_kind: str, config_kind: str) -> dict:
    """The parsed ``config.json`` of a folder whose ``"format"`` is ``format_name``; :class:`CheckpointError`
    naming the file otherwise: missing ("... is not {folder_kind}"), unreadable, or "not {config_kind}"."""
    path = Path(folder) / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} is not {folder_kind}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable: {error}") from None
    if not isinstance(info, dict) or info.get("format") != format_name:
        raise CheckpointError(f"{path}: not {config_kind} (expected format {format_name!r})")
    return info


def read_config_json(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model folder, as ``{"format", "version", "config", "extra"}``:
    ``config`` the architecture fields, ``extra`` every other key (version 1 and 2 alike)."""
    path = Path(folder) / CONFIG_FILE
    info = read_folder_config(folder, FORMAT, "an fmct model folder", "an fmct model config")
    if info.get("version", 1) == 1:
        if not isinstance(info.get("config"), dict):
            raise CheckpointError(f"{path}: not an fmct model config (version 1 needs a 'config' mapping)")
        return {"format": FORMAT, "version": 1, "config": info["config"], "extra": info.get("extra") or {}}
    config = {key: value for key, value in info.items() if key in _ARCHITECTURE_FIELDS}
    extra = {key: value for key, value in info.items() if key not in config and key not in ("format", "version")}
    return {"format": FORMAT, "version": info["version"], "config": config, "extra": extra}


def read_extra(folder: str | os.PathLike) -> dict:
    """The ``extra`` metadata saved with the model (empty dict when none)."""
    return read_config_json(folder).get("extra") or {}


def read_architecture(folder: str | os.PathLike) -> ViT3DConfig:
    """The :class:`ViT3DConfig` saved in a model folder's ``config.json``. Raises :class:`CheckpointError`."""
    try:
        return ViT3DConfig(**read_config_json(folder)["config"])
    except (TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE}: invalid model config: {error}") from None


def random_init(config: ViT3DConfig, seed: int, device: str | torch.device = "cpu") -> ViT3D:
    """A :class:`ViT3D` of architecture ``config`` with random weights, on ``device``, in eval mode: the
    random-init baseline of a model when ``config`` is that model's (:func:`read_architecture`).

    Seeds torch's global RNG with ``seed`` and draws the weights on the CPU, so one seed gives the same
    weights on every device; what is drawn after it (e.g. a head's init) follows from ``seed`` too.
    """
    torch.manual_seed(seed)
    return ViT3D(config).to(device).eval()


def load(folder: str | os.PathLike, device: str | torch.device = "cpu") -> "ViT3DModel":
    """The :class:`ViT3D` saved in ``folder`` (a :class:`ViT3DModel`, its extra metadata in ``hub_extra``),
    on ``device``, in eval mode. Raises :class:`CheckpointError`."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = read_architecture(folder)
    weights_path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(weights_path)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing") from None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file: {error}") from None
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = ViT3DModel(config)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()
        raise CheckpointError(
            f"{weights_path}: weights do not match {config_path}: {' '.join(r.strip() for r in reason[:3])}"
        ) from None
    model.hub_extra = read_extra(folder)
    return model.to(device).eval()


class ViT3DModel(ViT3D, ModelHubMixin, library_name="fmct", license="apache-2.0", tags=["fmct", "head-ct", "3d-vit"]):
    """A :class:`ViT3D` with Hugging Face's conventions: ``ViT3DModel.from_pretrained(path_or_name)``,
    ``model.save_pretrained(folder)`` (config.json, model.safetensors, README.md) and ``push_to_hub``.

    ``hub_extra`` is the metadata (HU windows, training run) read with the weights and written back by
    ``save_pretrained``.
    """

    hub_extra: dict = {}

    @property
    def windows(self) -> list[tuple[float, float]]:
        """The (level, width) HU windows of its input channels, as recorded with its weights (else the defaults)."""
        return _windows(self.hub_extra.get("windows"), "the model's extra metadata")

    def preprocess(self, hu: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The model input of canonical HU volumes (on fmct's canonical grid, as ingest writes them): float32
        (B, C, *img_size) in [0, 1] on the model's device, the whole volume resized and windowed
        (:func:`fmct.models.windows.model_input`). ``hu``: (X, Y, Z), (B, X, Y, Z) or (B, 1, X, Y, Z), numpy
        or torch, any dtype."""
        return model_input(hu_batch(hu).to(self.pos_embed.device), self.config.img_size, self.windows)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", **hub_kwargs
    ) -> "ViT3DModel":
        """The model of a model folder, a pretraining run or a shipped name (read here, never from the
        network); any other name is a Hugging Face Hub repo id, which huggingface_hub downloads (its
        ``revision``, ``cache_dir``, ``local_files_only``, ``token`` apply)."""
        if Path(name_or_path).exists() or str(name_or_path) in shipped_models():
            return load(resolve_model_dir(name_or_path), device)
        return super().from_pretrained(str(name_or_path), device=device, **hub_kwargs)

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, device: str | torch.device = "cpu", config: dict | None = None, **download
    ) -> "ViT3DModel":
        # A Hub repo id: fetch the folder, then read it like a local one (``config``, the parsed
        # config.json the mixin passes along, is read from the folder by load itself).
        return load(hub_snapshot(model_id, **download), device)

    def _save_pretrained(self, save_directory: Path) -> None:
        save(self, save_directory, extra=self.hub_extra)


def model_windows(model_dir: str | os.PathLike) -> list[tuple[float, float]]:
    """The (level, width) HU windows a model was trained with: ``extra["windows"]`` of its ``config.json``
    (as ``fmct pretrain`` records them), or :data:`fmct.models.windows.DEFAULT_WINDOWS` when none was recorded."""
    return _windows(read_extra(model_dir).get("windows"), str(Path(model_dir) / CONFIG_FILE))


def _windows(recorded, where: str) -> list[tuple[float, float]]:
    """Recorded windows as (level, width) HU pairs (:data:`DEFAULT_WINDOWS` when none); CheckpointError if malformed."""
    if recorded is None:
        return list(DEFAULT_WINDOWS)
    try:
        windows = [(float(level), float(width)) for level, width in recorded]
    except (TypeError, ValueError):
        windows = []
    if not windows or any(width <= 0 for _, width in windows):
        raise CheckpointError(f"{where}: extra.windows must be a list of [level, width] HU with width > 0")
    return windows


def model_name(model_dir: Path) -> str:
    """A readable name for a model folder: the run's name for ``RUN/backbone``, else the folder's."""
    return model_dir.parent.name if model_dir.name == "backbone" else model_dir.name


# ------------------------------------------------------------------------------------- backbones
RANDOM_INIT = "scratch"  # --model scratch [--like RUN|DIR|NAME]: a random init, the floor of a pretrained model


@dataclass
class ModelSource:
    """A backbone to build: the weights of a model folder, or a random init of an architecture.

    ``windows`` are the (level, width) HU windows its input channels take; ``like_dir`` is the folder
    whose architecture and windows a random init copies (None: the given architecture, default windows).
    """

    name: str
    config: ViT3DConfig
    windows: list[tuple[float, float]]
    model_dir: Path | None = None
    like_dir: Path | None = None

    @property
    def is_random_init(self) -> bool:
        return self.model_dir is None

    @cached_property
    def sha256(self) -> str:
        """sha256 of the weights file; empty for a random init (its weights follow from a seed)."""
        return "" if self.model_dir is None else file_sha256(self.model_dir / WEIGHTS_FILE)

    def build(self, device: str | torch.device, seed: int) -> ViT3D:
        """The backbone on ``device``: the saved weights, or a random init drawn from ``seed``."""
        return random_init(self.config, seed, device) if self.model_dir is None else load(self.model_dir, device)

    def identity(self) -> dict:
        """What decides the backbone's weights and input, as run records keep it: folders by their bare names
        (a record may be shared; the sha256 and architecture are what identify the weights)."""
        return {
            "name": self.name,
            "model_path": self.model_dir.resolve().name if self.model_dir else "",
            "like": self.like_dir.resolve().name if self.like_dir else "",
            "checkpoint_sha256": self.sha256,
            "model_config": dataclasses.asdict(self.config),
            "windows_hu": [list(w) for w in self.windows],
        }


def resolve_model(model: str, like: str | None = None, architecture: ViT3DConfig | None = None) -> ModelSource:
    """The backbone of ``--model RUN|DIR|NAME`` or ``--model scratch``.

    ``scratch`` is a random init with the architecture and windows of ``like`` (a run, model folder or
    shipped name), or of ``architecture`` with the default windows when no ``like`` is given; without
    either it is a :class:`UsageError`, as is ``like`` beside a pretrained model. A bad folder raises
    :class:`CheckpointError`.
    """
    if model != RANDOM_INIT:
        if like is not None:
            raise UsageError(f"--like only applies to --model {RANDOM_INIT}")
        model_dir = resolve_model_dir(model)
        return ModelSource(model_name(model_dir), read_architecture(model_dir), model_windows(model_dir), model_dir)
    if like is not None:
        like_dir = resolve_model_dir(like)
        return ModelSource(
            model_name(like_dir), read_architecture(like_dir), model_windows(like_dir), like_dir=like_dir
        )
    if architecture is None:
        raise UsageError(
            f"--model {RANDOM_INIT} needs --like RUN|DIR|NAME: the model whose architecture and windows it takes"
        )
    return ModelSource(f"vit-{architecture.size}", architecture, list(DEFAULT_WINDOWS))


def hub_snapshot(model_id: str, **download) -> str:
    """The local folder of Hugging Face Hub repo ``model_id``, downloaded unless cached; ``download`` is what
    the mixin's ``from_pretrained`` passes on (``revision``, ``cache_dir``, ``force_download``,
    ``local_files_only``, ``token``)."""
    return snapshot_download(model_id, **download)
