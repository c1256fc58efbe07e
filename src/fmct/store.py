"""The cache store: one losslessly compressed int16 file per canonical scan, plus a manifest and an errors table.

Layout of a store folder::

    store.json            what the store is: its canonical grid and the fingerprint of its pseudonym key
    config.yaml           resolved config of the latest ingest into it (the codec: store.codec)
    manifest.csv          one row per stored scan (columns: MANIFEST_COLUMNS)
    errors.csv            one row per skipped input: source, reason
    scans/<scan_id>.b2nd  int16 HU on the canonical RAS grid, axes (x, y, z) = (I, J, K), blosc2-compressed
                          (fmct.codec); ``.npy`` instead in a store written before compression, or by
                          codec npy. One volume file per scan, whatever its format.
    scans/<scan_id>.json  the scan's manifest row; written after the volume, so it marks the scan complete
    errors/<key>.json     one skipped input: {"source", "reason"}

No identifier is stored: ``scan_id``, ``patient_key``, ``study_key`` and ``source`` are keyed pseudonyms
(:mod:`fmct.pseudonym`), and reasons name files by pseudonym too. A store holds scans of one grid and
one key only (:func:`claim_store`).

Every file is written to a temporary name and renamed, so a killed job never leaves a file that looks
whole. The per-scan JSON files are the truth; ``manifest.csv`` and ``errors.csv`` are rebuilt from them.
Every reader of volumes goes through :meth:`Store.read`; :func:`migrate` rewrites a store in another codec.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.codec import DEFAULT_CODEC, SUFFIXES, check_codec, codec_of, decode, encode, read_volume, write_volume
from fmct.errors import ConfigError, InputError, ScanError
from fmct.fingerprint import file_sha256
from fmct.log import progress_bar
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

    ``store[i]`` and ``store[scan_id]`` return ``(hu, row)``: the canonical int16 HU volume (decoded into
    memory, see :meth:`read`), axes (x, y, z) in RAS order at ``row["store_spacing_mm"]``, and its
    manifest row as a dict.
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
        return self.read(key), self.row(key)

    def row(self, key: int | str) -> dict:
        """The manifest row of scan ``key`` (an index or a scan id)."""
        return self.rows[self._index[key] if isinstance(key, str) else key]

    def scan_file(self, key: int | str) -> Path:
        """The file holding the volume of scan ``key``: ``scans/<scan_id>.b2nd`` or ``.npy``."""
        return scan_file(self.path, self.row(key)["scan_id"])

    def read(self, key: int | str, out: np.ndarray | None = None, path: Path | None = None) -> np.ndarray:
        """The int16 HU volume (x, y, z) of scan ``key``, decoded into ``out`` when given, else a new array.

        The one reader of the store's volume files, whatever their codec: the scan's file, or ``path``
        (one of its files in another format, while it is being migrated). Raises
        :class:`~fmct.io.volume.ScanError` naming the file when it cannot be read or does not hold the
        int16 volume of the manifest's ``store_shape``.
        """
        path, shape = path or self.scan_file(key), self.row(key).get("store_shape")
        try:
            hu = read_volume(path, out)
        except (OSError, ValueError) as error:
            raise ScanError(f"{path}: cannot read: {error}") from None
        if hu.dtype != np.int16 or (shape is not None and list(hu.shape) != list(shape)):
            raise ScanError(f"{path}: expected int16 {list(shape or hu.shape)}, found {hu.dtype} {list(hu.shape)}")
        return hu

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        for i in range(len(self)):
            yield self[i]

    def affine(self, key: int | str) -> np.ndarray:
        """4x4 matrix from store voxel indices to the source's world RAS coordinates (mm)."""
        return np.asarray(self.row(key)["affine"], dtype=np.float64).reshape(4, 4)

    def errors(self) -> list[dict]:
        """The skipped inputs: dicts with ``source`` and ``reason``."""
        return [json.loads(p.read_text()) for p in sorted((self.path / "errors").glob("*.json"))]

    def _rows_from_scans(self) -> list[dict]:
        return sorted(
            (json.loads(p.read_text()) for p in (self.path / "scans").glob("*.json")),
            key=lambda row: row["scan_id"],
        )


# ------------------------------------------------------------------------------------------ writing
def store_identity(store_path: str | os.PathLike) -> dict:
    """How an artefact names a store without its path: the folder's bare name and the sha256 of its
    manifest (which scans, on which grid), so two stores of one name are told apart."""
    store_path = Path(store_path)
    manifest = store_path / "manifest.csv"
    return {"name": store_path.resolve().name, "manifest_sha256": file_sha256(manifest) if manifest.is_file() else ""}


def scan_file(store_path: Path, scan_id: str) -> Path:
    """The volume file of ``scan_id`` in the store: the compressed one when both exist (an interrupted
    migration), the ``.npy`` of an uncompressed store, else the path a compressed one would have."""
    scans = Path(store_path) / "scans"
    compressed, raw = scans / f"{scan_id}.b2nd", scans / f"{scan_id}.npy"
    return raw if raw.exists() and not compressed.exists() else compressed


def write_scan(store_path: Path, hu: np.ndarray, row: dict, codec: str = DEFAULT_CODEC) -> None:
    """Store one canonical scan: the int16 volume in ``codec`` (:data:`fmct.codec.CODECS`) first, then
    its manifest row that marks it complete."""
    scans = Path(store_path) / "scans"
    written = write_volume(scans / row["scan_id"], np.ascontiguousarray(hu, dtype=np.int16), codec)
    _remove_other_volume_files(written)
    atomic_write_text(scans / f"{row['scan_id']}.json", json.dumps(row))


def _remove_other_volume_files(kept: Path) -> None:
    """A scan has one volume file: remove those of its other formats (a rewrite in another codec)."""
    for suffix in set(SUFFIXES.values()) - {kept.suffix}:
        kept.with_suffix(suffix).unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------- migration
@dataclass
class MigrateSummary:
    """What a migration did. ``ok`` is False when a scan could not be migrated (it is left as it was)."""

    store: Path
    codec: str
    rewritten: int = 0
    already: int = 0  # scans already in the codec
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (scan_id, reason)
    bytes_before: int = 0  # volume files, all scans
    bytes_after: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        lines = [
            f"migrate: {self.rewritten} scans rewritten in {self.codec}, {self.already} already were; volume "
            f"files {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"
        ]
        lines += [f"migrate: {scan_id} left as it was: {reason}" for scan_id, reason in self.failed]
        return "\n".join(lines)


def migrate(store_path: str | os.PathLike, codec: str | None = None, progress: bool = True) -> MigrateSummary:
    """Rewrite every volume file of a store in ``codec``, in place; resumable, one scan at a time.

    ``codec`` defaults to the store's ``store.codec`` (config.yaml), else :data:`fmct.codec.DEFAULT_CODEC`,
    and is recorded there. (A later ingest writes its new scans in the codec of its own config; every
    file names its codec, so a store may mix them and still reads as one.) Per scan: its volume is decoded
    from the old file, encoded and checked to decode to the same bytes, written to a temporary name and
    renamed; the new file is read back and
    compared bit for bit with the old volume before the old file is removed. So a killed migration
    leaves each scan in its old file, in its new one, or in both (each whole and checked to be equal
    on the next run, which continues). A scan that cannot be read is left as it was and reported.
    """
    store = Store(store_path)
    config_path = store.path / "config.yaml"
    recorded = _read_yaml(config_path)
    codec = check_codec(codec or (recorded.get("store") or {}).get("codec") or DEFAULT_CODEC)
    summary = MigrateSummary(store=store.path, codec=codec)
    for scan_id in progress_bar(store.scan_ids, unit="scan", desc="migrate", enabled=progress):
        size_before = _file_size(store.scan_file(scan_id))
        try:
            rewritten = _migrate_scan(store, scan_id, codec)
        except ScanError as error:
            summary.failed.append((scan_id, str(error)))
        else:
            summary.rewritten += rewritten
            summary.already += not rewritten
        summary.bytes_before += size_before
        summary.bytes_after += _file_size(store.scan_file(scan_id))
    if config_path.exists():  # the codec is recorded; every other key (an older store's too) stays as it was
        recorded["store"] = {**(recorded.get("store") or {}), "codec": codec}
        atomic_write_text(config_path, yaml.safe_dump(recorded, sort_keys=False))
    return summary


def _migrate_scan(store: Store, scan_id: str, codec: str) -> bool:
    """Bring one scan's volume into ``codec`` (see :func:`migrate`); True when a file was written."""
    target = store.scan_file(scan_id).with_suffix(SUFFIXES[codec])
    files = [path for suffix in sorted(set(SUFFIXES.values())) if (path := target.with_suffix(suffix)).exists()]
    volumes = [store.read(scan_id, path=path) for path in files] or [store.read(scan_id)]  # none: read names it
    if any(not _same_volume(volume, volumes[0]) for volume in volumes[1:]):
        raise ScanError(f"{files[0]} and {files[1]} hold different volumes; both kept, resolve by hand")
    hu = volumes[0]
    written = not (target.exists() and codec_of(target.read_bytes()) == codec)
    if written:
        data = encode(hu, codec)
        if not _same_volume(decode(data), hu):
            raise ScanError(f"{target}: {codec} does not decode to the same volume; nothing changed")
        atomic_write_bytes(target, data)
        if not _same_volume(store.read(scan_id, path=target), hu):
            raise ScanError(f"{target}: reads back different from the volume written; the old file is kept")
    _remove_other_volume_files(target)
    return written


def _same_volume(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit: the same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; empty when the file is missing; InputError when it is not a mapping."""
    if not path.exists():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: unreadable: {error}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: not a mapping of config keys")
    return values


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


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
            f"{store_path}: "
            + (
                "made by an older fmct (salted keys, no store.json); ingest into a new store"
                if older
                else "not empty and not an fmct store; choose a new or empty folder"
            )
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
    differing = [
        f"{name} {stored.get(name)!r} there, {value!r} here"
        for name, value in canonical.items()
        if stored.get(name) != value
    ]
    if differing:
        raise ConfigError(
            f"{store_path}: holds scans of another canonical grid (canonical.{'; canonical.'.join(differing)}); "
            "a store never mixes grids: ingest into a new store"
        )
