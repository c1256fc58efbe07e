"""The cache store: one losslessly compressed int16 file per canonical scan, plus a manifest and an errors table.

Layout of a store folder::

    config.yaml           resolved ingest config: the salt of the pseudonymous keys, the codec (store.codec)
    manifest.csv          one row per stored scan (columns: MANIFEST_COLUMNS)
    errors.csv            one row per skipped input: source, reason
    scans/<scan_id>.b2nd  int16 HU on the canonical RAS grid, axes (x, y, z) = (I, J, K), blosc2-compressed
                          (fmct.codec); ``.npy`` instead in a store written before compression, or by
                          codec npy. One volume file per scan, whatever its format.
    scans/<scan_id>.json  the scan's manifest row; written after the volume, so it marks the scan complete
    errors/<key>.json     one skipped input: {"source", "reason"}

Every file is written to a temporary name and renamed, so a killed job never leaves a file that looks
whole. The per-scan JSON files are the truth; ``manifest.csv`` and ``errors.csv`` are rebuilt from them.
Every reader of volumes goes through :meth:`Store.read`; :func:`migrate` rewrites a store in another codec.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
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

from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.codec import DEFAULT_CODEC, SUFFIXES, check_codec, codec_of, decode, encode, read_volume, write_volume
from fmct.io.volume import ScanError

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

    ``store[i]`` and ``store[scan_id]`` return ``(hu, row)``: the canonical int16 HU volume (decoded into
    memory, see :meth:`read`), axes (x, y, z) in RAS order at ``row["store_spacing_mm"]``, and its
    manifest row as a dict.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "scans").is_dir():
            raise FileNotFoundError(f"{self.path}: not an fmct store (no scans/ folder)")
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
    atomic_write_text(store_path / "manifest.csv", _to_csv(rows, MANIFEST_COLUMNS))
    errors = [json.loads(p.read_text()) for p in sorted((store_path / "errors").glob("*.json"))]
    atomic_write_text(store_path / "errors.csv", _to_csv(errors, ["source", "reason"]))
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


def _to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(row.get(k)) if k in _JSON_COLUMNS else ("" if row.get(k) is None else row.get(k)) for k in columns}
        )
    return buffer.getvalue()


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
        lines = [f"migrate: {self.rewritten} scans rewritten in {self.codec}, {self.already} already were; volume "
                 f"files {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"]
        lines += [f"migrate: {scan_id} left as it was: {reason}" for scan_id, reason in self.failed]
        return "\n".join(lines)


def migrate(store_path: str | os.PathLike, codec: str | None = None, progress: bool = True) -> MigrateSummary:
    """Rewrite every volume file of a store in ``codec``, in place; resumable, one scan at a time.

    ``codec`` defaults to the store's ``store.codec`` (config.yaml), else :data:`fmct.codec.DEFAULT_CODEC`,
    and is recorded there. (A later ingest writes its new scans in the codec of its own config; every
    file names its codec, so a store may mix them and still reads as one.) Per scan: its volume is decoded from the old file, encoded and checked to
    decode to the same bytes, written to a temporary name and renamed; the new file is read back and
    compared bit for bit with the old volume before the old file is removed. So a killed migration
    leaves each scan in its old file, in its new one, or in both (each whole and checked to be equal
    on the next run, which continues). A scan that cannot be read is left as it was and reported.
    """
    from fmct.config import IngestConfig, load_config, save_config

    store = Store(store_path)
    config_path = store.path / "config.yaml"
    config = load_config(IngestConfig, config_path if config_path.exists() else None)
    codec = check_codec(codec or config.store.codec)
    summary = MigrateSummary(store=store.path, codec=codec)
    for scan_id in tqdm(store.scan_ids, unit="scan", desc="migrate", disable=not progress, dynamic_ncols=True):
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
    if config_path.exists():  # a store without one (not made by ingest) gets none: its salt is not known
        save_config(dataclasses.replace(config, store=dataclasses.replace(config.store, codec=codec)), config_path)
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


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


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
    from fmct.config import ConfigError, save_config
    from fmct.io import discover, select_series
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
    nifti_files = [p for p in all_files if p.name.endswith((".nii", ".nii.gz"))]
    series, unreadable = discover([p for p in all_files if not p.name.endswith((".nii", ".nii.gz"))])
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
    from fmct.config import ConfigError, IngestConfig, load_config

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
    from fmct.io import ScanError, read_nifti, read_series
    from fmct.preprocess import canonical

    source = job.source if hasattr(job, "source") else str(job)
    try:
        volume = read_nifti(job) if isinstance(job, (str, Path)) else read_series(job, config.selection)
        source = volume.source or source
        result = canonical(volume, config.canonical)
    except ScanError as error:
        return scan_id, str(error), source
    except Exception as error:  # a bad scan must never stop the batch; keep its reason on one line
        return scan_id, f"unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", source
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
    write_scan(store_path, result.hu, row, config.store.codec)
    return scan_id, None, source
