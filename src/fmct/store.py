"""The cache store: one memory-mappable int16 file per canonical scan, plus a manifest and an errors table.

Layout of a store folder::

    store.json           what the store is: its canonical grid and the fingerprint of its pseudonym key
    config.yaml          resolved config of the latest ingest into it
    manifest.csv         one row per stored scan (columns: MANIFEST_COLUMNS)
    errors.csv           one row per skipped input: source, reason
    scans/<scan_id>.npy  int16 HU on the canonical RAS grid, axes (x, y, z) = (I, J, K)
    scans/<scan_id>.json the scan's manifest row; written after the .npy, so it marks the scan complete
    errors/<key>.json    one skipped input: {"source", "reason"}

No identifier is stored: ``scan_id``, ``patient_key``, ``study_key`` and ``source`` are keyed pseudonyms
(:mod:`fmct.pseudonym`), and reasons name files by pseudonym too. A store holds scans of one grid and
one key only (:func:`claim_store`).

Every file is written to a temporary name and renamed, so a killed job never leaves a file that looks
whole. The per-scan JSON files are the truth; ``manifest.csv`` and ``errors.csv`` are rebuilt from them.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from fmct.atomic import atomic_save_npy, atomic_write_text
from fmct.errors import ConfigError, InputError
from fmct.tables import rows_to_csv

MANIFEST_COLUMNS = [
    "scan_id",
    "patient_key",
    "study_key",
    "source",  # pseudonym of the series folder or NIfTI file; the real path is only in the local source map
    "original_shape",
    "original_spacing_mm",
    "slice_thickness_mm",
    "kernel",
    "kvp",
    "manufacturer",
    "model",
    "store_shape",
    "store_spacing_mm",
    "affine",  # 4x4 row-major: store voxel (i, j, k) -> source world RAS mm (DICOM LPS with x, y negated)
    "notes",  # what was set aside to keep the scan (a localizer, frames in another orientation, a bad copy)
]
STORE_FORMAT = 1
_JSON_COLUMNS = {"original_shape", "original_spacing_mm", "store_shape", "store_spacing_mm", "affine"}


# ---------------------------------------------------------------------------------------- the store
class Store:
    """Read access to a store folder written by ``fmct ingest``.

    ``store[i]`` and ``store[scan_id]`` return ``(hu, row)``: the canonical int16 HU volume, memory-mapped,
    axes (x, y, z) in RAS order at ``row["store_spacing_mm"]``, and its manifest row as a dict.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "scans").is_dir():
            raise InputError(f"{self.path}: not an fmct store (no scans/ folder)")
        manifest = self.path / "manifest.csv"
        rows = read_manifest(manifest) if manifest.exists() else None
        if rows is None or len(rows) != len(list((self.path / "scans").glob("*.json"))):
            rows = self._rows_from_scans()
        self.rows: list[dict] = rows
        self._index = {row["scan_id"]: i for i, row in enumerate(rows)}

    @property
    def scan_ids(self) -> list[str]:
        return [row["scan_id"] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, scan_id: str) -> bool:
        return scan_id in self._index

    def __getitem__(self, key: int | str) -> tuple[np.ndarray, dict]:
        row = self.rows[self._index[key] if isinstance(key, str) else key]
        hu = np.load(self.path / "scans" / f"{row['scan_id']}.npy", mmap_mode="r", allow_pickle=False)
        return hu, row

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        for i in range(len(self)):
            yield self[i]

    def affine(self, key: int | str) -> np.ndarray:
        """4x4 matrix from store voxel indices to the source's world RAS coordinates (mm)."""
        row = self.rows[self._index[key] if isinstance(key, str) else key]
        return np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)

    def errors(self) -> list[dict]:
        """The skipped inputs: dicts with ``source`` and ``reason``."""
        return [json.loads(p.read_text()) for p in sorted((self.path / "errors").glob("*.json"))]

    def _rows_from_scans(self) -> list[dict]:
        return sorted(
            (json.loads(p.read_text()) for p in (self.path / "scans").glob("*.json")),
            key=lambda row: row["scan_id"],
        )


# ------------------------------------------------------------------------------------------ writing
def write_scan(store_path: Path, hu: np.ndarray, row: dict) -> None:
    """Store one canonical scan: the int16 volume first, then its manifest row that marks it complete."""
    scans = Path(store_path) / "scans"
    atomic_save_npy(scans / f"{row['scan_id']}.npy", np.ascontiguousarray(hu, dtype=np.int16))
    atomic_write_text(scans / f"{row['scan_id']}.json", json.dumps(row))


def write_error(store_path: Path, key: str, source: str, reason: str) -> None:
    """Record a skipped input under ``key`` (a pseudonymous hash of its source)."""
    atomic_write_text(Path(store_path) / "errors" / f"{key}.json", json.dumps({"source": source, "reason": reason}))


def clear_error(store_path: Path, key: str) -> None:
    (Path(store_path) / "errors" / f"{key}.json").unlink(missing_ok=True)


def rebuild_tables(store_path: Path) -> tuple[int, int]:
    """Rewrite ``manifest.csv`` and ``errors.csv`` from the per-scan files; return (scans, errors)."""
    store_path = Path(store_path)
    rows = sorted(
        (json.loads(p.read_text()) for p in (store_path / "scans").glob("*.json")), key=lambda r: r["scan_id"]
    )
    atomic_write_text(store_path / "manifest.csv", rows_to_csv(_table_rows(rows), MANIFEST_COLUMNS))
    errors = [json.loads(p.read_text()) for p in sorted((store_path / "errors").glob("*.json"))]
    atomic_write_text(store_path / "errors.csv", rows_to_csv(errors, ["source", "reason"]))
    return len(rows), len(errors)


def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest.csv with list columns decoded and numbers as numbers."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict = {}
            for key, value in raw.items():
                if key in _JSON_COLUMNS:
                    row[key] = json.loads(value)
                elif key in ("slice_thickness_mm", "kvp"):
                    row[key] = float(value) if value else None
                else:
                    row[key] = value
            rows.append(row)
    return rows


def _table_rows(rows: list[dict]) -> list[dict]:
    # JSON columns hold lists (spacing, shape); read_manifest decodes them, "null" included.
    return [{**row, **{key: json.dumps(row.get(key)) for key in _JSON_COLUMNS}} for row in rows]


# ------------------------------------------------------------------------------------ store identity
def claim_store(store_path: Path, canonical: dict, key_fingerprint: str) -> None:
    """Make ``store_path`` a store of grid ``canonical`` and key ``key_fingerprint``, or check that it is one.

    A new (or empty) folder gets ``store.json``, ``scans/`` and ``errors/``. An existing store of another
    grid or key is refused, as is a non-empty folder that is not a store, with a one-line ConfigError:
    a store never mixes grids, and never holds keys of two pseudonym keys.
    """
    store_path = Path(store_path)
    if store_path.exists() and not store_path.is_dir():
        raise ConfigError(f"{store_path}: is a file; --out names the store folder")
    identity_path = store_path / "store.json"
    if identity_path.exists():
        _check_identity(store_path, json.loads(identity_path.read_text()), canonical, key_fingerprint)
    elif store_path.exists() and any(store_path.iterdir()):
        older = (store_path / "scans").is_dir()
        raise ConfigError(
            f"{store_path}: " + ("made by an older fmct (salted keys, no store.json); ingest into a new store" if older
                                  else "not empty and not an fmct store; choose a new or empty folder")
        )
    else:
        identity = {"format": STORE_FORMAT, "canonical": canonical, "key_fingerprint": key_fingerprint}
        atomic_write_text(identity_path, json.dumps(identity, indent=2) + "\n")
    (store_path / "scans").mkdir(exist_ok=True)
    (store_path / "errors").mkdir(exist_ok=True)


def _check_identity(store_path: Path, identity: dict, canonical: dict, key_fingerprint: str) -> None:
    if identity.get("key_fingerprint") != key_fingerprint:
        raise ConfigError(
            f"{store_path}: made with another pseudonym key (fingerprint {identity.get('key_fingerprint')}, this key "
            f"{key_fingerprint}); ingest with that key (--key FILE or $FMCT_KEY_FILE) or into a new store"
        )
    stored = identity.get("canonical", {})
    differing = [f"{name} {stored.get(name)!r} there, {value!r} here" for name, value in canonical.items() if stored.get(name) != value]
    if differing:
        raise ConfigError(
            f"{store_path}: holds scans of another canonical grid (canonical.{'; canonical.'.join(differing)}); "
            "a store never mixes grids: ingest into a new store"
        )
