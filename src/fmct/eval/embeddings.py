"""The embeddings table written by ``fmct embed`` and read by ``fmct probe``, and the feature sets a probe
reads from it.

An embeddings folder holds two files, both free of pickle:

- ``embeddings.npz``: ``scan_id`` as a fixed-width unicode array (N,), and one float32 array (N, C) per
  feature: for a backbone ``cls`` (the CLS token), ``patch_mean`` and ``patch_max`` (the mean and the
  per-channel maximum of the patch tokens; :mod:`fmct.models.encode`; tables written before ``patch_max``
  lack it); for the HU histogram floor ``first_order`` (:mod:`fmct.eval.radiomics`). Row i of every array
  belongs to ``scan_id[i]``.
- ``embeddings.json``: the model identity and settings behind the features (e.g. ``model``, ``arm``,
  checkpoint path and sha256, input size, and ``default_feature``: the feature set a probe reads unless
  told otherwise, ``auto`` when absent), copied by the probe into its ``run.json``.

A backbone's **feature sets** are :data:`fmct.models.encode.FEATURE_SETS`. ``auto`` is no set of its
own: the probe fits each of :data:`AUTO_CANDIDATES` and keeps the best on validation
(:func:`fmct.eval.classifiers.choose_features`).
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
from fmct.models.encode import FEATURE_SETS, OPTIONAL_FEATURES

AUTO = "auto"
AUTO_CANDIDATES = ("change", "cls", "concat", "cls_mean_max")  # smallest first: a tie keeps the smaller


@dataclass
class Embeddings:
    """Features of scans: ``features[name]`` has shape (len(scan_ids), C), row i for ``scan_ids[i]``."""

    scan_ids: np.ndarray
    features: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def default_feature(self) -> str:
        """The feature set a probe reads unless told otherwise: the meta's ``default_feature`` (``auto`` for a
        backbone's table, ``first_order`` for the HU histogram's; ``cls`` in a table written before
        ``auto``), else ``auto``."""
        return self.meta.get("default_feature") or AUTO

    def feature_matrix(self, name: str) -> np.ndarray:
        """(N, C) float64 features of a feature set of :data:`FEATURE_SETS` (its features side by side) or
        of any feature of the table by its name (e.g. ``first_order``). :class:`InputError` when the table
        lacks one."""
        names = FEATURE_SETS.get(name, (name,))
        missing = [n for n in names if n not in self.features]
        if missing:
            made_before = (
                " (a table written before fmct embed wrote it: embed again)" if missing == ["patch_max"] else ""
            )
            raise InputError(
                f"embeddings hold no feature {missing[0]!r}{made_before} "
                f"(they hold: {', '.join(sorted(self.features))})"
            )
        return np.concatenate([self.features[n] for n in names], axis=1).astype(np.float64)

    def candidates(self, name: str) -> tuple[dict[str, np.ndarray], str]:
        """The feature sets a probe of ``name`` chooses among, ``{set: (N, C) float64}``, and a note on the
        candidates left out ("" when none).

        ``auto``: those of :data:`AUTO_CANDIDATES` the table holds every feature of (a table without
        ``patch_max`` leaves out ``cls_mean_max``, and says so; one without ``change``, a backbone without
        change heads, leaves out ``change`` without a note); any other name: that set or feature alone.
        :class:`InputError` when there is none (``auto`` on the HU histogram's table).
        """
        if name != AUTO:
            return {name: self.feature_matrix(name)}, ""
        usable = [c for c in AUTO_CANDIDATES if set(FEATURE_SETS[c]) <= set(self.features)]
        if not usable:
            raise InputError(
                f"feature set {AUTO}: the embeddings hold none of a backbone's features (they hold: "
                f"{', '.join(sorted(self.features))}); name a feature with --features"
            )
        left_out = [
            c for c in AUTO_CANDIDATES if c not in usable and not set(FEATURE_SETS[c]) <= set(OPTIONAL_FEATURES)
        ]
        note = (
            f"feature set {AUTO} left out {', '.join(left_out)}: the embeddings lack "
            f"{', '.join(sorted({n for c in left_out for n in FEATURE_SETS[c]} - set(self.features)))}"
            if left_out
            else ""
        )
        return {c: self.feature_matrix(c) for c in usable}, note


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
