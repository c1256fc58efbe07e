"""The cache store: one memory-mappable int16 file per canonical scan, plus a manifest and an errors table.

Layout of a store folder::

    config.yaml          resolved ingest config, including the salt of the pseudonymous keys
    manifest.csv         one row per stored scan (columns: MANIFEST_COLUMNS)
    errors.csv           one row per skipped input: source, reason
    scans/<scan_id>.npy  int16 HU on the canonical RAS grid, axes (x, y, z) = (I, J, K)
    scans/<scan_id>.json the scan's manifest row; written after the .npy, so it marks the scan complete
    errors/<key>.json    one skipped input: {"source", "reason"}

Every file is written to a temporary name and renamed, so a killed job never leaves a file that looks
whole. The per-scan JSON files are the truth; ``manifest.csv`` and ``errors.csv`` are rebuilt from them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from tqdm import tqdm

from fmct.atomic import atomic_save_npy, atomic_write_text
from fmct.tables import rows_to_csv
from fmct.errors import InputError, one_line

if TYPE_CHECKING:
    from fmct.config import IngestConfig

MANIFEST_COLUMNS = [
    "scan_id",
    "patient_key",
    "study_key",
    "source",
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
]
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


# ------------------------------------------------------------------------------------------- ingest
@dataclass
class IngestSummary:
    """What an ingest run did. ``ok`` is False only when inputs were given and none could be stored."""

    store: Path
    stored: int = 0
    already_stored: int = 0
    skipped: int = 0  # inputs skipped in this run, each with its reason in errors.csv
    skipped_before: int = 0  # inputs that failed in an earlier run and were not retried
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.stored + self.already_stored > 0 or self.skipped == 0

    def describe(self) -> str:
        rate = self.stored / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"stored {self.stored} new scans in {self.seconds:.1f} s ({rate:.2f} scans/s); "
            f"{self.already_stored} were already in {self.store}"
        ]
        if self.skipped or self.skipped_before:
            lines.append(
                f"skipped {self.skipped} inputs (+{self.skipped_before} from earlier runs, --retry-failed "
                f"retries them); reasons in {self.store / 'errors.csv'}"
            )
        return "\n".join(lines)


def ingest(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    config: "IngestConfig",
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> IngestSummary:
    """Read DICOM series and NIfTI files under ``sources`` into the store ``out``; resumable.

    Series are discovered by SeriesInstanceUID, selected by ``config.selection``, read to HU, resampled
    to ``config.canonical`` and written atomically, ``workers`` processes at a time. Scans already in
    the store are skipped; inputs that failed before are skipped unless ``retry_failed``. A bad input
    never stops the batch: its one-line reason goes to ``errors.csv``. Identifiers are replaced by salted
    hashes (``scan_id``, ``patient_key``, ``study_key``) before anything is written.
    """
    from fmct.config import save_config
    from fmct.errors import ConfigError
    from fmct.io import discover, is_nifti, select_series
    from fmct.io.dicom import walk_files

    started = time.perf_counter()
    missing = [str(s) for s in sources if not Path(s).exists()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such file or folder")
    store_path = Path(out)
    config = _settle_salt(store_path, config)
    (store_path / "scans").mkdir(parents=True, exist_ok=True)
    (store_path / "errors").mkdir(exist_ok=True)
    save_config(config, store_path / "config.yaml")
    # Absolute sources, so that labels can be matched to scans from any working directory.
    walked = {source: walk_files([source]) for source in map(os.path.abspath, sources)}
    all_files = [p for files in walked.values() for p in files]
    nifti_files = [p for p in all_files if is_nifti(p)]
    series, unreadable = discover([p for p in all_files if not is_nifti(p)])
    kept, rejected = select_series(series, config.selection)

    salt = config.salt
    summary = IngestSummary(store=store_path)
    problems = unreadable + rejected
    recognised = {str(p) for info in series for p in info.files} | {str(p) for p in nifti_files}
    recognised |= {str(path) for path, _ in unreadable}
    for source, files in walked.items():
        if not any(str(p) in recognised for p in files):
            problems.append((source, "no DICOM series or NIfTI file found here"))
    for source, reason in problems:
        write_error(store_path, pseudonym(salt, "source", str(source)), str(source), reason)
        summary.skipped += 1

    jobs = [(pseudonym(salt, "series", info.series_uid), info) for info in kept]
    jobs += [(pseudonym(salt, "series", str(Path(path).resolve())), path) for path in nifti_files]
    todo = []
    for scan_id, job in jobs:
        if (store_path / "scans" / f"{scan_id}.json").exists():
            summary.already_stored += 1
        elif (store_path / "errors" / f"{scan_id}.json").exists() and not retry_failed:
            summary.skipped_before += 1
        else:
            todo.append((scan_id, job))

    try:
        for scan_id, reason, source in _run(todo, store_path, config, workers, progress):
            if reason is None:
                clear_error(store_path, scan_id)
                summary.stored += 1
            else:
                write_error(store_path, scan_id, source, reason)
                summary.skipped += 1
    finally:
        rebuild_tables(store_path)
        summary.seconds = time.perf_counter() - started
    return summary


def pseudonym(salt: str, kind: str, value: str) -> str:
    """A 16-hex-digit salted SHA-256 of ``value``: stable for one salt, meaningless without it."""
    return hashlib.sha256(f"{salt}\x00{kind}\x00{value}".encode()).hexdigest()[:16]


def _settle_salt(store_path: Path, config: "IngestConfig") -> "IngestConfig":
    """Use the store's salt for an existing store; a new random one for a new store unless given."""
    from fmct.config import IngestConfig, load_config
    from fmct.errors import ConfigError

    existing = store_path / "config.yaml"
    if existing.exists():
        stored_salt = load_config(IngestConfig, existing).salt
        if config.salt and config.salt != stored_salt:
            raise ConfigError(f"{store_path}: the store was made with another salt; keys would not match")
        return dataclasses.replace(config, salt=stored_salt)
    return dataclasses.replace(config, salt=config.salt or secrets.token_hex(16))


def _run(todo, store_path: Path, config, workers: int, progress: bool):
    """Yield (scan_id, reason or None, source) as jobs finish, in a pool of ``workers`` processes."""
    if workers <= 1 or len(todo) <= 1:
        with _one_thread(), tqdm(
            total=len(todo), unit="scan", desc="ingest", disable=not progress or not todo, dynamic_ncols=True
        ) as bar:
            for scan_id, job in todo:
                yield _ingest_one(scan_id, job, store_path, config)
                bar.update()
        return
    # fork starts workers in milliseconds with everything imported; spawn re-imports torch in each.
    # The pool is made before the progress bar so that no bar thread exists when the workers fork.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_limit_threads) as pool:
        futures = [pool.submit(_ingest_one, scan_id, job, store_path, config) for scan_id, job in todo]
        with tqdm(total=len(todo), unit="scan", desc="ingest", disable=not progress, dynamic_ncols=True) as bar:
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


@contextlib.contextmanager
def _one_thread():
    """torch and the BLAS/OpenMP pools on one thread: --workers sets the parallelism (restored after)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def _limit_threads() -> None:
    """Pool initializer: a worker process keeps one thread for its whole life."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # applied now and kept: not used as a context


def _ingest_one(scan_id: str, job, store_path: Path, config) -> tuple[str, str | None, str]:
    """Read, canonicalise and store one scan; return (scan_id, None, source) or (scan_id, reason, source)."""
    from fmct.errors import ScanError
    from fmct.io import read_nifti, read_series
    from fmct.preprocess import canonical

    source = job.source if hasattr(job, "source") else str(job)
    try:
        volume = read_nifti(job) if isinstance(job, (str, Path)) else read_series(job, config.selection)
        source = volume.source or source
        result = canonical(volume, config.canonical)
    except ScanError as error:
        return scan_id, str(error), source
    except Exception as error:  # a bad scan must never stop the batch; keep its reason on one line
        return scan_id, f"unexpected {type(error).__name__}: {one_line(error)}", source
    salt = config.salt
    identity = volume.identity
    meta = result.metadata
    row = {
        "scan_id": scan_id,
        "patient_key": pseudonym(salt, "patient", identity.get("patient_id") or identity.get("series_uid", source)),
        "study_key": pseudonym(salt, "study", identity.get("study_uid") or identity.get("series_uid", source)),
        "source": source,
        "original_shape": list(volume.shape),
        "original_spacing_mm": [round(float(s), 6) for s in volume.spacing_mm],
        "slice_thickness_mm": meta.get("slice_thickness_mm"),
        "kernel": meta.get("kernel", ""),
        "kvp": meta.get("kvp"),
        "manufacturer": meta.get("manufacturer", ""),
        "model": meta.get("model", ""),
        "store_shape": list(result.shape),
        "store_spacing_mm": [float(s) for s in result.spacing_mm],
        "affine": [float(v) for v in result.affine.ravel()],
    }
    write_scan(store_path, result.hu, row)
    return scan_id, None, source
