"""Dataset adapters: a dataset's own label files -> the labels table (README: The labels file).

``load_labels(spec)`` reads ``spec``, a path optionally prefixed by the adapter to use:
``cq500:reads.csv``, ``rsna:stage_2_train.csv`` or ``generic:labels.csv``. Without a prefix the adapter
is chosen by the header: per-reader columns ``R1:ICH`` -> CQ500, exactly ``ID,Label`` -> RSNA, anything
else -> the generic labels CSV. ``fmct probe --labels`` takes the same spec.

Rows keyed by ``source`` are tied to store scans by :func:`match_to_store`.
"""

from __future__ import annotations

import bisect
import csv
import os
import re
from pathlib import Path

from fmct.datasets.cq500 import is_cq500, read_cq500
from fmct.datasets.generic import Labels, read_generic, write_labels
from fmct.datasets.rsna import is_rsna, read_rsna
from fmct.errors import InputError
from fmct.pseudonym import local_sources

ADAPTERS = {"cq500": read_cq500, "rsna": read_rsna, "generic": read_generic}

__all__ = ["ADAPTERS", "Labels", "load_labels", "match_to_store", "write_labels"]


def load_labels(spec: str, rename: dict[str, str] | None = None) -> Labels:
    """Labels from ``[adapter:]path``; ``rename`` (generic CSV only) maps its column names to ours."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ADAPTERS:
        adapter, path = prefix, Path(rest)
    else:
        path = Path(spec)
        adapter = _detect(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found")
    if rename and adapter != "generic":
        raise InputError(f"{path}: column renaming applies to generic CSVs only, not {adapter}")
    return read_generic(path, rename) if adapter == "generic" else ADAPTERS[adapter](path)


def _detect(path: Path) -> str:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read labels: {error}") from None
    if is_cq500(header):
        return "cq500"
    if is_rsna(header):
        return "rsna"
    return "generic"


def _location(source: str, base: str = "") -> tuple[str, str]:
    """(absolute path, series tag) of a source; ingest names a DICOM series ``<folder>#<10-hex hash of its UID>``.

    A relative path is taken relative to ``base`` (the labels file's folder) when it exists there, as in
    ``fmct synth``'s labels.csv, else relative to the working directory.
    """
    location, sep, tag = source.rpartition("#")
    if not sep or not re.fullmatch(r"[0-9a-f]{10}", tag):
        location, tag = source, ""
    location = os.path.expanduser(location)
    if base and not os.path.isabs(location) and os.path.exists(os.path.join(base, location)):
        location = os.path.join(base, location)
    return os.path.normcase(os.path.abspath(location)).rstrip(os.sep), tag


def match_to_store(labels: Labels, manifest_rows: list[dict]) -> tuple[list[dict], int]:
    """Give every label row its store scan ids; return (rows with ``scan_id`` set, label rows without a scan).

    A row with a ``scan_id`` keeps it. A row with a ``source`` matches each stored scan whose source
    is that path (a NIfTI file, or the series named exactly, ``folder#hash``), whose series lies in that
    folder, or lies in a folder inside it. A row matching several scans (several series of a study kept)
    gives each of them its labels; a scan matched by two rows is an error. A store names its sources by
    pseudonym: their paths come from the local source map beside the pseudonym key
    (:func:`fmct.pseudonym.local_sources`), so labels keyed by source match only where that map is.
    """
    real_sources = local_sources()
    by_location: dict[str, list[tuple[str, dict]]] = {}
    for scan in manifest_rows:
        location, tag = _location(real_sources.get(scan["source"], scan["source"]))
        by_location.setdefault(location, []).append((tag, scan))
    locations = sorted(by_location)
    base = os.path.dirname(os.path.abspath(labels.origin)) if labels.origin else ""
    matched, unmatched, owner = [], 0, {}
    for index, row in enumerate(labels.rows):
        if row.get("scan_id"):
            matched.append(row)
            continue
        location, tag = _location(row["source"], base)
        scans = [scan for scan_tag, scan in by_location.get(location, []) if not tag or scan_tag == tag]
        if not tag:
            scans += [scan for inside in _locations_under(locations, location) for _, scan in by_location[inside]]
        if not scans:
            unmatched += 1
            continue
        for scan in scans:
            if owner.get(scan["scan_id"], index) != index:
                other = labels.rows[owner[scan["scan_id"]]]["source"]
                raise InputError(
                    f"scan {scan['scan_id']} (source {scan['source']}) matches two label rows: "
                    f"{row['source']} and {other}"
                )
            owner[scan["scan_id"]] = index
            matched.append({**row, "scan_id": scan["scan_id"]})
    return matched, unmatched


def _locations_under(sorted_locations: list[str], folder: str) -> list[str]:
    """The entries of ``sorted_locations`` that lie inside ``folder``."""
    prefix = folder + os.sep
    start = bisect.bisect_left(sorted_locations, prefix)
    found = []
    for location in sorted_locations[start:]:
        if not location.startswith(prefix):
            break
        found.append(location)
    return found
