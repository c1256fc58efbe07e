"""One scan of an ingest, as a worker runs it: read, resample to the canonical grid, store its row.

Everything that leaves this module is pseudonymous: the manifest row holds keyed pseudonyms in place of
the PatientID, the Study and Series UIDs and the source path, and a reason names a file by the
pseudonym of its path (the local source map, beside the key, has the path for the user).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmct.config import IngestConfig
from fmct.io import FileScanError, ScanError, SeriesInfo, Volume, read_nifti, read_series
from fmct.preprocess import canonical
from fmct.pseudonym import PseudonymKey, scrubbed_reason
from fmct.store import write_scan


@dataclass
class ScanJob:
    """One scan to ingest: a DICOM ``series`` or a ``nifti`` file.

    ``source`` is the real series name (folder#hash) or file path: only its pseudonym is written.
    ``beside`` lists (file, reason) of unreadable DICOM files in the series' folders, which a failed
    series' reason names (they may be its missing slices) and a stored one's notes count.
    """

    scan_id: str
    source: str
    series: SeriesInfo | None = None
    nifti: str | None = None
    beside: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.series.all_files if self.series is not None else [Path(self.nifti or self.source)]


@dataclass
class ScanResult:
    """What became of a job: ``reason`` None when stored; ``named`` maps the pseudonyms of files that
    ``reason`` names to their real paths (for the local source map)."""

    scan_id: str
    source: str  # pseudonym
    reason: str | None = None
    named: dict[str, str] = field(default_factory=dict)


def ingest_scan(job: ScanJob, store_path: Path, config: IngestConfig, key: PseudonymKey) -> ScanResult:
    """Read ``job``, resample it to ``config.canonical`` and write it into the store; never raises for
    a bad scan (its reason comes back instead)."""
    source = key.pseudonym("source", job.source)
    try:
        volume = read_nifti(job.nifti) if job.nifti else read_series(job.series, config.selection)
        result = canonical(volume, config.canonical)
    except ScanError as error:
        reason, named = failure_reason(error, job, key)
        return ScanResult(job.scan_id, source, reason, named)
    except Exception as error:  # a bad scan must never stop the batch; keep its reason on one line
        return ScanResult(job.scan_id, source, _without_names(f"unexpected {type(error).__name__}: {scrubbed_reason(error)}", job))
    write_scan(store_path, result.hu, manifest_row(job, volume, result, key), config.store.codec)
    return ScanResult(job.scan_id, source)


def failure_reason(error: ScanError, job: ScanJob, key: PseudonymKey) -> tuple[str, dict[str, str]]:
    """The one-line reason for the errors table and the files it names: a file by the pseudonym of its
    path, and the unreadable files beside the series (a 'gap' may be one of them)."""
    named: dict[str, str] = {}
    if isinstance(error, FileScanError) and str(error.path) != job.nifti:
        name = key.pseudonym("source", str(error.path))
        named[name] = str(error.path)
        reason = f"file {name}: {error.reason}"
    else:
        reason = error.reason if isinstance(error, FileScanError) else str(error)
    if job.beside:
        path, why = job.beside[0]
        name = key.pseudonym("source", path)
        named[name] = path
        reason += f"; its folder holds {len(job.beside)} unreadable DICOM files, such as file {name} ({why})"
    return _without_names(reason, job), named


def manifest_row(job: ScanJob, volume: Volume, result: Volume, key: PseudonymKey) -> dict:
    """The scan's manifest row (``fmct.store.MANIFEST_COLUMNS``): pseudonyms and safe acquisition facts."""
    identity, meta = volume.identity, result.metadata
    fallback = identity.get("series_uid") or job.source  # no PatientID: the series is its own patient
    notes = list(meta.get("notes", []))
    if job.beside:
        notes.append(f"{len(job.beside)} unreadable DICOM files in its folder were left out (see errors.csv)")
    return {
        "scan_id": job.scan_id,
        "patient_key": key.pseudonym("patient", identity.get("patient_id") or fallback),
        "study_key": key.pseudonym("study", identity.get("study_uid") or fallback),
        "source": key.pseudonym("source", job.source),
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
        "notes": "; ".join(notes),
    }


def _without_names(text: str, job: ScanJob) -> str:
    """``text`` with the paths of the job's files and folders cut out, spaces and all (a third-party
    message may quote one; exports name files and folders after patients)."""
    paths = {part for path in job.files for part in (str(path), str(path.parent))}
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, "<path>")
    return text
