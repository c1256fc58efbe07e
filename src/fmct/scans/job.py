"""One scan to read (:class:`ScanJob`), reading it onto the canonical grid, and what becomes of a scan that
cannot be read: a one-line reason that names a file only by the pseudonym of its path (the local source
map, beside the key, has the path for the user).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmct.config import IngestConfig
from fmct.io import FileScanError, ScanError, SeriesInfo, Volume, read_nifti, read_series
from fmct.preprocess import canonical
from fmct.pseudonym import PseudonymKey, scrubbed_reason


@dataclass
class ScanJob:
    """One scan to read: a DICOM ``series`` or a ``nifti`` file.

    ``source`` is the real series name (folder#hash) or file path: only its pseudonym is written.
    ``input`` is the position (1, 2, ...) of the source given to the verb that holds it. ``beside`` lists
    (file, reason) of unreadable DICOM files in the series' folders, which a failed series' reason names
    (they may be its missing slices) and a stored one's notes count.
    """

    scan_id: str
    source: str
    input: int = 1
    series: SeriesInfo | None = None
    nifti: str | None = None
    beside: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.series.all_files if self.series is not None else [Path(self.nifti or self.source)]


@dataclass
class ScanResult:
    """What became of a job: ``reason`` None when it was used; ``named`` maps the pseudonyms of files that
    ``reason`` names to their real paths (for the local source map)."""

    scan_id: str
    source: str  # pseudonym
    reason: str | None = None
    named: dict[str, str] = field(default_factory=dict)


def read_canonical(job: ScanJob, config: IngestConfig) -> tuple[Volume, Volume]:
    """The scan of ``job`` as read (HU, affine in mm, identity and metadata) and resampled onto
    ``config.canonical``. Raises ScanError, or whatever a third-party reader raises on a hostile file."""
    volume = read_nifti(job.nifti) if job.nifti else read_series(job.series, config.selection)
    return volume, canonical(volume, config.canonical)


def failed(job: ScanJob, error: Exception, key: PseudonymKey) -> ScanResult:
    """The result of ``job`` when reading it raised ``error``: a ScanError's reason, a file it blames named
    by the pseudonym of its path; any other error as unexpected; then the unreadable files beside the
    series (a 'gap' may be one of them). No path of the job's files is left in it."""
    named: dict[str, str] = {}
    if isinstance(error, FileScanError) and str(error.path) != job.nifti:
        name = key.pseudonym("source", str(error.path))
        named[name] = str(error.path)
        reason = f"file {name}: {error.reason}"
    elif isinstance(error, FileScanError):
        reason = error.reason
    elif isinstance(error, ScanError):
        reason = str(error)
    else:
        reason = f"unexpected {type(error).__name__}: {scrubbed_reason(error)}"
    note, beside = unreadable_note(job.beside, key)
    return ScanResult(
        job.scan_id, key.pseudonym("source", job.source), _without_names(reason + note, job), named | beside
    )


def died(job: ScanJob, what: str, key: PseudonymKey, retry: str) -> ScanResult:
    """The result of ``job`` when the worker process reading it died (``what``: the signal or exit status);
    ``retry`` says how the verb tries it again."""
    reason = (
        f"the worker process reading this scan died ({what}): a crash in native code such as an image decoder, "
        f"or out of memory; the batch went on without it ({retry})"
    )
    return ScanResult(job.scan_id, key.pseudonym("source", job.source), reason)


def unreadable_note(files: list[tuple[str, str]], key: PseudonymKey) -> tuple[str, dict[str, str]]:
    """What a series' reason adds of the unreadable ``files`` (file, reason) in its folders: how many, and
    the first by the pseudonym of its path with its reason; and {pseudonym: path}. ("", {}) for none."""
    if not files:
        return "", {}
    path, why = files[0]
    name = key.pseudonym("source", path)
    return f"; its folder holds {len(files)} unreadable DICOM files, such as file {name} ({why})", {name: path}


def _without_names(text: str, job: ScanJob) -> str:
    """``text`` with the paths of the job's files and folders cut out, spaces and all (a third-party
    message may quote one; exports name files and folders after patients)."""
    paths = {part for path in job.files for part in (str(path), str(path.parent))}
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, "<path>")
    return text
