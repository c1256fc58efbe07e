"""One scan of an ingest, as a worker runs it: read onto the canonical grid (:mod:`fmct.scans`), store its
volume and row.

Everything that leaves this module is pseudonymous: the manifest row holds keyed pseudonyms in place of
the PatientID, the Study and Series UIDs and the source path, and a reason names a file by the
pseudonym of its path (the local source map, beside the key, has the path for the user).
"""

from __future__ import annotations

from pathlib import Path

from fmct.config import IngestConfig
from fmct.io import Volume
from fmct.pseudonym import PseudonymKey
from fmct.scans import ScanJob, ScanResult, failed, read_canonical
from fmct.store import write_scan


def ingest_scan(job: ScanJob, store_path: Path, config: IngestConfig, key: PseudonymKey) -> ScanResult:
    """Read ``job``, resample it to ``config.canonical`` and write it into the store; never raises for
    a bad scan (its reason comes back instead)."""
    try:
        volume, result = read_canonical(job, config)
    except Exception as error:  # a bad scan must never stop the batch; its reason is one line
        return failed(job, error, key)
    write_scan(store_path, result.hu, manifest_row(job, volume, result, key), config.store.codec)
    return ScanResult(job.scan_id, key.pseudonym("source", job.source))


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
