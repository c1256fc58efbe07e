"""What an ingest run will do, from the file tree alone: the scans to read, and every input that is no
scan, each with its reason. Every file under the sources ends up in exactly one of the two: a series
(or a copy or set-aside part of one), a NIfTI file, or a skipped input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fmct.config import SelectionConfig
from fmct.ingest.scan import ScanJob
from fmct.io import SeriesInfo, is_nifti, select_series
from fmct.io.dicom import discover_files, unused_file_reason, walk_files
from fmct.pseudonym import PseudonymKey


@dataclass
class IngestPlan:
    """``jobs``: the scans to read; ``skipped``: (real source, reason) of every input that is not one."""

    jobs: list[ScanJob]
    skipped: list[tuple[str, str]]

    def source_names(self, key: PseudonymKey) -> dict[str, str]:
        """{pseudonym: real source} of every job and skipped input: the entries of the local source map."""
        sources = [job.source for job in self.jobs] + [source for source, _ in self.skipped]
        return {key.pseudonym("source", source): source for source in sources}


def plan_ingest(sources: list[str | os.PathLike], selection: SelectionConfig, key: PseudonymKey) -> IngestPlan:
    """Walk ``sources`` (absolute paths, so that labels match from any working directory), find the DICOM
    series and NIfTI files, select the series by ``selection`` and name each scan by the keyed pseudonym
    of its SeriesInstanceUID (a NIfTI file: of its resolved path)."""
    walked = {source: walk_files([source]) for source in map(os.path.abspath, sources)}
    files = [path for found in walked.values() for path in found]
    nifti_files = [path for path in files if is_nifti(path)]
    series, unreadable, covered = discover_files([path for path in files if not is_nifti(path)])
    kept, rejected = select_series(series, selection)
    used = {str(path) for path in covered} | {str(path) for path in nifti_files}
    skipped = unreadable + rejected + [(str(path), unused_file_reason(path)) for path in files if str(path) not in used]
    skipped += [(source, "no DICOM series or NIfTI file found here")
                for source, found in walked.items() if not any(str(path) in used for path in found)]
    jobs = [ScanJob(key.pseudonym("series", info.series_uid), info.source, series=info,
                    beside=_unreadable_beside(info, unreadable)) for info in kept]
    jobs += [ScanJob(key.pseudonym("series", str(Path(path).resolve())), str(path), nifti=str(path)) for path in nifti_files]
    return IngestPlan(jobs=jobs, skipped=skipped)


def _unreadable_beside(info: SeriesInfo, unreadable: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The unreadable DICOM files that lie in a folder of the series' files."""
    folders = {str(path.parent) for path in info.files}
    return [(path, reason) for path, reason in unreadable if str(Path(path).parent) in folders]
