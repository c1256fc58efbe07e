"""A pretraining run folder: what it holds, whether a config may resume it, and its exported backbone.

``config.yaml`` (the resolved config), ``log.jsonl`` (one line per logging step, :mod:`fmct.ssl.monitor`),
``checkpoint.pt`` (:mod:`fmct.ssl.checkpoint`), ``tensorboard/`` (when TensorBoard is installed) and
``backbone/`` (the teacher backbone as a model folder of :mod:`fmct.hub`, refreshed with every checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fmct import hub
from fmct.config import load_config, to_dict
from fmct.errors import ConfigError
from fmct.fingerprint import settings_sha256
from fmct.models import ViT3D
from fmct.ssl.config import RESUMABLE_KEYS, PretrainConfig

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
BACKBONE_DIR = "backbone"


def config_digest(config: PretrainConfig) -> str:
    """SHA-256 of the config's fields that decide what a step computes (all but RESUMABLE_KEYS)."""
    return settings_sha256(
        {key: value for key, value in _flatten(to_dict(config)).items() if key not in RESUMABLE_KEYS}
    )


def check_resumable(run_dir: Path, config: PretrainConfig) -> None:
    """Raise ConfigError when ``config`` differs from the run's saved config beyond RESUMABLE_KEYS."""
    saved = _flatten(to_dict(load_config(PretrainConfig, run_dir / CONFIG_FILE)))
    current = _flatten(to_dict(config))
    changed = sorted(
        key for key in saved.keys() | current.keys() if key not in RESUMABLE_KEYS and saved.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:3])
        raise ConfigError(
            f"{run_dir / CONFIG_FILE}: cannot resume with a changed config ({details}); only "
            f"{', '.join(RESUMABLE_KEYS)} may change; use a new --out folder for a new run"
        )


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def export_backbone(model_state: dict, config: PretrainConfig, folder: Path, extra: dict) -> None:
    """Save the ``backbone.*`` weights of a full model state dict as an fmct model folder (hub format)."""
    with torch.device("meta"):
        backbone = ViT3D(config.model)
    prefix = "backbone."
    weights = {name[len(prefix) :]: tensor for name, tensor in model_state.items() if name.startswith(prefix)}
    backbone.load_state_dict(weights, strict=True, assign=True)
    hub.save(backbone, folder, extra=extra)
