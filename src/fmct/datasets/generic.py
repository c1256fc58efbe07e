"""The labels table (README: The labels file), read from a generic CSV (with optional column renaming) and written back.

Format: one row per scan, keyed by ``scan_id`` (a store scan) or ``source`` (the path given to ingest);
optional ``patient_id``, ``site``, ``split`` (train, val, test); every other column is a finding with
1 (present), 0 (absent) or empty (unknown: the scan is left out for that finding).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from fmct.atomic import atomic_write_text
from fmct.errors import InputError
from fmct.log import logger
from fmct.tables import rows_to_csv

KEY_COLUMNS = ("scan_id", "source")
META_COLUMNS = ("patient_id", "site", "split")
# The findings fmct knows by name (what synth draws and the dataset adapters map to). A labels column of
# another name is still used, with a warning, since a typo (ihc) would otherwise be a new finding unseen.
FINDINGS = (
    "ich",
    "iph",
    "ivh",
    "sdh",
    "edh",
    "sah",
    "infarct",
    "hydrocephalus",
    "atrophy",
    "mass",
    "midline_shift",
    "fracture",
)
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}
_UNKNOWN = {"", "na", "nan", "n/a", "none", "-1", "?"}


@dataclass
class Labels:
    """Rows of the labels table: dicts with ``scan_id``/``source``, ``patient_id``, ``site``, ``split`` (str,
    possibly empty) and one value per finding (1, 0 or None for unknown); ``notes`` say what an adapter
    could not use."""

    rows: list[dict]
    findings: list[str]
    origin: str = ""
    notes: list[str] = field(default_factory=list)


def unknown_finding(name: str) -> str:
    """The warning for a labels column that is not one of :data:`FINDINGS`, with the closest known name:
    ``ihc: not a known finding; did you mean ich? (used as a finding of its own)``."""
    distance, closest = min((_edit_distance(name.lower(), known), known) for known in FINDINGS)
    guess = (
        f"did you mean {closest}?" if distance <= max(1, len(name) // 3) else f"known findings: {', '.join(FINDINGS)}"
    )
    return f"{name}: not a known finding; {guess} (used as a finding of its own)"


def _edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from ``a`` to ``b``: a typo such as ihc for
    ich is one swap."""
    previous, row = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (a[i - 1] != b[j - 1]))
            if previous is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous[j - 2] + 1)
        previous, row = row, current
    return row[len(b)]


def parse_label(value: str, where: str) -> int | None:
    """A finding cell as 1, 0 or None (unknown); anything else raises ValueError naming ``where``."""
    text = value.strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    if text in _UNKNOWN:
        return None
    raise InputError(f"{where}: label {value!r} is not 1, 0 or empty")


def read_generic(path: str | os.PathLike, rename: dict[str, str] | None = None) -> Labels:
    """Read a labels CSV; ``rename`` maps the file's column names to ours (e.g. {"Hemorrhage": "ich"})."""
    path = Path(path)
    rename = rename or {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            original = [c.strip() for c in reader.fieldnames or []]
            raw_rows = [list(row.values()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read labels CSV: {error}") from None
    missing = sorted(set(rename) - set(original))
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} to rename (columns: {', '.join(original)})")
    header = [rename.get(c, c) for c in original]
    if len(set(header)) != len(header):
        raise InputError(f"{path}: duplicate column names after renaming: {header}")
    key = next((c for c in KEY_COLUMNS if c in header), None)
    if key is None:
        raise InputError(f"{path}: needs a scan_id or source column (columns: {', '.join(header)})")
    findings = [c for c in header if c not in KEY_COLUMNS + META_COLUMNS]
    if not findings:
        raise InputError(f"{path}: no finding column")
    for finding in findings:
        if finding not in FINDINGS:
            logger.warning(f"{path}: {unknown_finding(finding)}")
    rows = []
    for line, values in enumerate(raw_rows, start=2):
        if len(values) != len(header) or any(v is None for v in values):
            raise InputError(f"{path}:{line}: {len(values)} cells for {len(header)} columns")
        cells = dict(zip(header, (v.strip() for v in values)))
        if not cells[key]:
            raise InputError(f"{path}:{line}: empty {key}")
        row = {c: cells.get(c, "") for c in KEY_COLUMNS + META_COLUMNS}
        for finding in findings:
            row[finding] = parse_label(cells[finding], f"{path}:{line} column {finding}")
        rows.append(row)
    return Labels(rows=rows, findings=findings, origin=str(path))


def write_labels(labels: Labels, path: str | os.PathLike) -> None:
    """Write ``labels`` as a labels CSV (unknown as empty), atomically."""
    columns = [c for c in KEY_COLUMNS if any(row.get(c) for row in labels.rows)] + list(META_COLUMNS) + labels.findings
    atomic_write_text(Path(path), rows_to_csv(labels.rows, columns))
