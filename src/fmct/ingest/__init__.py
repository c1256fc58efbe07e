"""``fmct ingest``: DICOM series and NIfTI files -> a store of canonical int16 HU volumes (``fmct.store``).

The run, step by step: check the paths, load the pseudonym key (kept outside the store), claim the
store (one grid, one key), plan from the file tree (:func:`fmct.scans.plan_scans`), record every input
that is no scan, then read the scans in crash-isolated workers (:class:`fmct.scans.WorkerPool`, each scan
by :mod:`fmct.ingest.scan`) and rebuild the tables. Resumable: scans already stored are skipped, and inputs
that failed before unless ``retry_failed``. No identifier is written: see :mod:`fmct.pseudonym`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fmct.config import IngestConfig, save_config, to_dict
from fmct.errors import ConfigError
from fmct.ingest.scan import ingest_scan
from fmct.pseudonym import PseudonymKey, load_key
from fmct.scans import ScanJob, ScanPlan, ScanResult, WorkerPool, died, plan_scans
from fmct.store import claim_store, clear_error, rebuild_tables, write_error

__all__ = ["IngestSummary", "ingest"]


@dataclass
class IngestSummary:
    """What an ingest run did. ``ok`` is False only when inputs were given and none could be stored."""

    store: Path
    stored: int = 0
    already_stored: int = 0
    skipped: int = 0  # inputs skipped in this run, each with its reason in errors.csv
    skipped_before: int = 0  # inputs that failed in an earlier run and were not retried
    seconds: float = 0.0
    source_map: Path | None = None  # the local map pseudonym -> real path, when kept

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
        if self.source_map is not None:
            lines.append(
                f"sources are named by pseudonym; their real paths are in {self.source_map} (local, never share it)"
            )
        return "\n".join(lines)


def ingest(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    config: IngestConfig,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
    key_file: str | os.PathLike | None = None,
) -> IngestSummary:
    """Read DICOM series and NIfTI files under ``sources`` into the store ``out``; resumable.

    Series are discovered by SeriesInstanceUID, selected by ``config.selection``, read to HU, resampled
    to ``config.canonical`` and written atomically by ``workers`` processes; a process that dies costs
    only its scan. A bad input never stops the batch: its one-line reason goes to ``errors.csv``.
    Identifiers become keyed pseudonyms under the key at ``key_file`` (else ``$FMCT_KEY_FILE``, else
    ``~/.config/fmct/pseudonym.key``, made on first use). A store of another grid or key is refused
    before any work (ConfigError).
    """
    started = time.perf_counter()
    store_path = Path(out)
    _check_paths(sources, store_path, workers)
    # A new key only for a new store: an existing one was made with a key that must be found, not replaced.
    key = load_key(key_file, create=not (store_path / "store.json").exists(), outside=store_path)
    claim_store(store_path, to_dict(config.canonical), key.fingerprint)
    save_config(config, store_path / "config.yaml")
    plan = plan_scans(sources, config.selection, key)
    if config.source_map:
        key.record_sources(plan.source_names(key))
    summary = IngestSummary(store=store_path, source_map=key.source_map_path if config.source_map else None)
    _record_skipped(store_path, plan, key, summary)
    todo = _not_done(plan.jobs, store_path, retry_failed, summary)
    try:
        with WorkerPool(partial(ingest_scan, store_path=store_path, config=config, key=key), workers) as pool:
            # A scan whose worker died is recorded as failed, so that a re-run does not crash on it again.
            on_death = partial(died, key=key, retry="--retry-failed tries it again")
            for _, result in pool.run(todo, on_death=on_death, desc="ingest", progress=progress):
                _record_result(store_path, result, key if config.source_map else None, summary)
    finally:
        rebuild_tables(store_path)
        summary.seconds = time.perf_counter() - started
    return summary


def _check_paths(sources: list[str | os.PathLike], store_path: Path, workers: int) -> None:
    """Usage errors, before anything is made: a missing source, --out a file, fewer than one worker."""
    missing = [str(s) for s in sources if not Path(s).exists()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such file or folder")
    blocking = next((path for path in [store_path, *store_path.parents] if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise ConfigError(
            f"{store_path}: {'is' if blocking == store_path else f'{blocking} is'} a file; --out names the store folder"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")


def _record_skipped(store_path: Path, plan: ScanPlan, key: PseudonymKey, summary: IngestSummary) -> None:
    """One row of errors.csv per skipped input (the plan names each once), counted as it is written."""
    for skipped in plan.skipped:
        name = key.pseudonym("source", skipped.source)
        write_error(store_path, name, name, skipped.reason)
        summary.skipped += 1


def _not_done(jobs: list[ScanJob], store_path: Path, retry_failed: bool, summary: IngestSummary) -> list[ScanJob]:
    """The jobs still to run: not stored yet, and not failed before unless ``retry_failed``."""
    todo = []
    for job in jobs:
        if (store_path / "scans" / f"{job.scan_id}.json").exists():
            summary.already_stored += 1
        elif (store_path / "errors" / f"{job.scan_id}.json").exists() and not retry_failed:
            summary.skipped_before += 1
        else:
            todo.append(job)
    return todo


def _record_result(store_path: Path, result: ScanResult, key: PseudonymKey | None, summary: IngestSummary) -> None:
    """Count a finished job; a failure's reason goes to the errors table, the files it names to the map."""
    if result.reason is None:
        clear_error(store_path, result.scan_id)
        clear_error(store_path, result.source)  # skipped by an earlier run's selection, stored now
        summary.stored += 1
        return
    write_error(store_path, result.scan_id, result.source, result.reason)
    if key is not None:
        key.record_sources(result.named)
    summary.skipped += 1
