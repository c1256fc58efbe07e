"""The embeddings table written by ``fmct embed`` and read by ``fmct probe``.

An embeddings folder holds two files, both free of pickle:

- ``embeddings.npz``: ``scan_id`` as a fixed-width unicode array (N,), and one float32 array (N, C) per
  feature: for a backbone ``cls`` (the CLS token) and ``patch_mean`` (the mean of the patch tokens), from
  which the probe builds ``concat``; for the HU histogram floor ``first_order`` (:mod:`fmct.eval.radiomics`).
  Row i of every array belongs to ``scan_id[i]``.
- ``embeddings.json``: the model identity and settings behind the features (e.g. ``model``, ``arm``,
  checkpoint path and sha256, input size, and ``default_feature``: the feature a probe reads unless told
  otherwise, ``cls`` when absent), copied by the probe into its ``run.json``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.errors import InputError

FEATURE_NAMES = ("cls", "patch_mean")


@dataclass
class Embeddings:
    """Features of scans: ``features[name]`` has shape (len(scan_ids), C), row i for ``scan_ids[i]``."""

    scan_ids: np.ndarray
    features: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def default_feature(self) -> str:
        """The feature a probe reads unless told otherwise: the meta's ``default_feature``, else ``cls``."""
        return self.meta.get("default_feature") or "cls"

    def feature_matrix(self, name: str) -> np.ndarray:
        """(N, C) float64 features by name: any of the table's, or ``concat`` (``cls`` and ``patch_mean`` side by side)."""
        if name == "concat":
            return np.concatenate([self.feature_matrix(n) for n in FEATURE_NAMES], axis=1)
        if name not in self.features:
            raise InputError(f"embeddings hold no feature {name!r} (they hold: {', '.join(sorted(self.features))})")
        return self.features[name].astype(np.float64)


def write_embeddings(
    path: str | os.PathLike, scan_ids: list[str] | np.ndarray, features: dict[str, np.ndarray], meta: dict | None = None
) -> None:
    """Write an embeddings folder at ``path``: ``embeddings.npz`` then ``embeddings.json``, each atomically."""
    scan_ids = np.asarray([str(s) for s in scan_ids])
    if len(set(scan_ids.tolist())) != len(scan_ids):
        raise InputError("scan ids of an embeddings table must be unique")
    arrays = {"scan_id": scan_ids.astype(f"<U{max(1, max((len(s) for s in scan_ids), default=1))}")}
    for name, values in features.items():
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != len(scan_ids):
            raise InputError(f"feature {name}: shape {values.shape} is not (n_scans={len(scan_ids)}, C)")
        if name == "scan_id":
            raise InputError("'scan_id' is reserved for the scan ids")
        arrays[name] = values
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    folder = Path(path)
    atomic_write_bytes(folder / "embeddings.npz", buffer.getvalue())
    atomic_write_text(folder / "embeddings.json", json.dumps(meta or {}, indent=2, sort_keys=True))


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read an embeddings folder (or its ``embeddings.npz``); a bad file raises ValueError naming it."""
    path = Path(path)
    npz_path = path / "embeddings.npz" if path.is_dir() else path
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"{npz_path}: cannot read embeddings: {error}") from None
    if "scan_id" not in arrays:
        raise InputError(f"{npz_path}: no scan_id array")
    scan_ids = arrays.pop("scan_id").astype(str)
    for name, values in arrays.items():
        if values.ndim != 2 or values.shape[0] != len(scan_ids):
            raise InputError(f"{npz_path}: feature {name} has shape {values.shape}, expected ({len(scan_ids)}, C)")
    meta_path = npz_path.with_name("embeddings.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Embeddings(scan_ids=scan_ids, features=arrays, meta=meta)
