"""CQ500 (qure.ai): ``reads.csv`` of three readers -> the labels table, one row per study.

``reads.csv`` has a study name column (``name``, e.g. ``CQ500-CT-427``) and per-reader columns
``R1:ICH``, ``R2:ICH``, ``R3:ICH``, ... (0/1). A finding's label is the majority of the readers who
gave one (two of three); a tie between two readers, or no reader, is unknown.

Each study's ``source`` is its folder under the folder of ``reads.csv``: the first folder (searched
breadth-first) whose name, or the first word of it, equals the study name with punctuation removed,
case-insensitively (the public archive unpacks ``CQ500-CT-427`` as ``CQ500CT427 CQ500CT427/``). Every
series that ingest keeps from inside that folder carries the study's labels. Studies whose folder is
not found keep ``<csv folder>/<name>`` as source and match no scan.
"""

from __future__ import annotations

import csv
import os
import re
from collections import deque
from pathlib import Path

from fmct.datasets.generic import Labels, parse_label
from fmct.errors import InputError

# CQ500 column -> fmct finding name. The other CQ500 columns (bleed side, chronic bleed, calvarial and
# other fracture) have no fmct finding.
FINDING_COLUMNS = {
    "ICH": "ich",
    "IPH": "iph",
    "IVH": "ivh",
    "SDH": "sdh",
    "EDH": "edh",
    "SAH": "sah",
    "Fracture": "fracture",
    "MassEffect": "mass",
    "MidlineShift": "midline_shift",
}
READER_COLUMN = re.compile(r"^(R\d+):(.+)$")


def is_cq500(header: list[str]) -> bool:
    """True when a CSV header has per-reader columns such as ``R1:ICH``."""
    return any(READER_COLUMN.match(c.strip()) and c.strip().split(":", 1)[1] in FINDING_COLUMNS for c in header)


def _normalised(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _study_folders(root: Path, names: list[str]) -> dict[str, Path]:
    wanted = {_normalised(n): n for n in names}
    found: dict[str, Path] = {}
    queue = deque([root])
    while queue and len(found) < len(wanted):
        folder = queue.popleft()
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            continue
        for child in children:
            words = child.name.split()
            key = next(
                (k for k in (_normalised(child.name), _normalised(words[0]) if words else "") if k in wanted), None
            )
            if key and wanted[key] not in found:
                found[wanted[key]] = child
            else:
                queue.append(child)
    return found


def read_cq500(path: str | os.PathLike) -> Labels:
    """Read CQ500's ``reads.csv`` into the labels table (majority of readers, findings of FINDING_COLUMNS)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [c.strip() for c in reader.fieldnames or []]
            raw_rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read CQ500 reads: {error}") from None
    name_column = next((c for c in header if c.lower() in ("name", "study", "study_name")), None)
    if name_column is None:
        raise InputError(f"{path}: no study name column (name)")
    readers: dict[str, list[str]] = {}
    for column in header:
        match = READER_COLUMN.match(column)
        if match and match.group(2) in FINDING_COLUMNS:
            readers.setdefault(FINDING_COLUMNS[match.group(2)], []).append(column)
    if not readers:
        raise InputError(f"{path}: no reader columns such as R1:ICH")
    findings = [f for f in FINDING_COLUMNS.values() if f in readers]
    names = [row[name_column] for row in raw_rows]
    folders = _study_folders(path.parent, names)
    rows = []
    for line, raw in enumerate(raw_rows, start=2):
        name = raw[name_column]
        if not name:
            raise InputError(f"{path}:{line}: empty study name")
        row = {
            "scan_id": "",
            "source": str(folders.get(name, path.parent / name)),
            "patient_id": name,
            "site": "cq500",
            "split": "",
        }
        for finding in findings:
            votes = [parse_label(raw[c], f"{path}:{line} column {c}") for c in readers[finding]]
            votes = [v for v in votes if v is not None]
            positive = sum(votes)
            row[finding] = 1 if 2 * positive > len(votes) else 0 if 2 * positive < len(votes) else None
        rows.append(row)
    missing = len(names) - len(folders)
    notes = [f"{missing} of {len(names)} studies have no folder under {path.parent}"] if missing else []
    return Labels(rows=rows, findings=findings, origin=str(path), notes=notes)
