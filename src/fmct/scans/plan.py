"""What a run over a file tree will read, from the tree alone: the scans to read, and every input that is
no scan, each with its reason. Every file under the sources ends up in exactly one of the two: a series
(or a copy or set-aside part of one), a NIfTI file, or a skipped input; a folder whose files cannot be
listed is a skipped input too. Each skipped input is recorded once: one row per input in an errors table."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from fmct.config import SelectionConfig
from fmct.errors import InputError
from fmct.io import ScanError, SeriesInfo, Volume, is_nifti, read_nifti, read_series, select_series
from fmct.io.dicom import discover_files, truncated_files, unused_file_reason, walk_files
from fmct.pseudonym import PseudonymKey
from fmct.scans.job import ScanJob, failed, unreadable_note

NOTHING_HERE = "no DICOM series or NIfTI file found here"


class SkippedInput(NamedTuple):
    """An input that is no scan: ``source`` its real path (file or folder) or series name (folder#hash),
    of which only the pseudonym is written; ``input`` the position (1, 2, ...) of the source holding it."""

    source: str
    reason: str
    input: int


@dataclass
class ScanPlan:
    """``jobs``: the scans to read; ``skipped``: every input that is not one; ``named``: {pseudonym: real
    path} of the files that skipped inputs' reasons name."""

    jobs: list[ScanJob]
    skipped: list[SkippedInput]
    named: dict[str, str] = field(default_factory=dict)

    def source_names(self, key: PseudonymKey) -> dict[str, str]:
        """{pseudonym: real path} of every job, skipped input and named file: the entries of the local source map."""
        sources = [job.source for job in self.jobs] + [skipped.source for skipped in self.skipped]
        return self.named | {key.pseudonym("source", source): source for source in sources}


def plan_scans(sources: list[str | os.PathLike], selection: SelectionConfig, key: PseudonymKey) -> ScanPlan:
    """Walk ``sources`` (made absolute, so that labels match from any working directory), find the DICOM
    series (the DICOM files of all sources discovered together: a series given file by file is one scan)
    and NIfTI files, select the series by ``selection`` and name each scan by the keyed pseudonym of its
    SeriesInstanceUID (a NIfTI file: of its resolved path). A file under two sources belongs to the first."""
    sources = [os.path.abspath(source) for source in sources]
    input_of: dict[str, int] = {}  # file -> position of the first source holding it
    found: list[list[Path]] = []  # per source
    skipped: list[SkippedInput] = []
    for number, source in enumerate(sources, start=1):
        if not os.path.exists(source):
            skipped.append(SkippedInput(source, "no such file or folder", number))
        files, unlisted = walk_files([source])
        found.append(files)
        for path in files:
            input_of.setdefault(str(path), number)
        skipped += [
            SkippedInput(folder, f"folder {key.pseudonym('source', folder)}: {why}", number) for folder, why in unlisted
        ]
    files = [Path(path) for path in input_of]
    nifti_files = [path for path in files if is_nifti(path)]
    series, unreadable, covered = discover_files([path for path in files if not is_nifti(path)])
    kept, rejected = select_series(series, selection)
    where = _positions(input_of)
    skipped += [SkippedInput(name, reason, where(name)) for name, reason in unreadable]
    by_source, named = {info.source: info for info in series}, {}
    for name, reason in rejected:
        # A series cut short by a broken file says so: "1 slices" alone would hide that the file is truncated.
        note, noted = unreadable_note(
            _unreadable_beside(by_source[name], unreadable) + truncated_files(by_source[name]), key
        )
        named |= noted
        skipped.append(SkippedInput(name, reason + note, where(name)))
    used = {str(path) for path in covered} | {str(path) for path in nifti_files}
    skipped += [
        SkippedInput(str(path), unused_file_reason(path), input_of[str(path)])
        for path in files
        if str(path) not in used
    ]
    recorded = {entry.source for entry in skipped}  # a file or folder given as a source has its own reason already
    skipped += [
        SkippedInput(source, NOTHING_HERE, number)
        for number, (source, files) in enumerate(zip(sources, found), start=1)
        if source not in recorded and not any(str(path) in used for path in files)
    ]
    jobs = [
        ScanJob(
            key.pseudonym("series", info.series_uid),
            info.source,
            where(info.source),
            series=info,
            beside=_unreadable_beside(info, unreadable),
        )
        for info in kept
    ]
    jobs += [
        ScanJob(key.pseudonym("series", str(path.resolve())), str(path), input_of[str(path)], nifti=str(path))
        for path in nifti_files
    ]
    return ScanPlan(jobs=_each_once(jobs), skipped=sorted(skipped, key=lambda entry: entry.input), named=named)


def _positions(input_of: dict[str, int]) -> Callable[[str], int]:
    """The position of the source holding a file, or a series (folder#hash): that of its main folder."""
    folders: dict[str, int] = {}
    for path, number in input_of.items():
        folders.setdefault(str(Path(path).parent), number)
    return lambda name: input_of.get(name) or folders[name.rpartition("#")[0]]


def _unreadable_beside(info: SeriesInfo, unreadable: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The unreadable DICOM files that lie in a folder of the series' files."""
    folders = {str(path.parent) for path in info.files}
    return [(path, reason) for path, reason in unreadable if str(Path(path).parent) in folders]


def _each_once(jobs: list[ScanJob]) -> list[ScanJob]:
    """``jobs`` in the order of their sources, a scan met twice (one NIfTI file through two links) once."""
    unique: dict[str, ScanJob] = {}
    for job in jobs:
        unique.setdefault(job.scan_id, job)
    return sorted(unique.values(), key=lambda job: job.input)


def read_one_scan(path: str | os.PathLike, selection: SelectionConfig) -> Volume:
    """The one scan under ``path`` (a DICOM series folder or file, or a NIfTI file), read as ``fmct ingest``
    reads it, for a caller that wants it in memory (``Detector.predict``). :class:`InputError` naming the
    path when it holds no usable scan (with the first reason) or several."""
    key = PseudonymKey(secrets.token_bytes(32), Path(os.devnull))  # names nothing that outlives this call
    plan = plan_scans([path], selection, key)
    if not plan.jobs:
        reason = plan.skipped[0].reason if plan.skipped else NOTHING_HERE
        raise InputError(f"{path}: no scan to predict ({reason})")
    if len(plan.jobs) > 1:
        raise InputError(
            f"{path}: holds {len(plan.jobs)} scans that the selection keeps; pass one series folder or file"
        )
    job = plan.jobs[0]
    try:
        return read_nifti(job.nifti) if job.nifti else read_series(job.series, selection)
    except ScanError as error:
        raise InputError(f"{path}: {failed(job, error, key).reason}") from None
