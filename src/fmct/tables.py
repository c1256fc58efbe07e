"""CSV tables fmct writes (manifest, errors, predictions, metrics, labels of synthetic cohorts), and the
JSON-lines logs it appends to (:func:`read_jsonl`).

One writer, Python's :mod:`csv` with its quoting, so a comma, quote or newline in a cell can never shift
a column. A cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``,
a tab or a carriage return, as OWASP lists them) gets a leading apostrophe, unless it is a plain number
such as ``-0.5``: opening a table never runs code, and numbers stay numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


def neutralised(value: object) -> object:
    """``value`` as it may stand in a cell: text a spreadsheet would read as a formula is prefixed with ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def cell_text(value: object) -> str:
    """How a value stands in a cell: None and NaN empty, floats at full precision (``repr``), the rest ``str``."""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if value is None:
        return ""
    return str(neutralised(str(value)))


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    """The CSV text of ``rows`` (dicts keyed by column; keys outside ``columns`` are left out, missing
    keys are empty cells) under a header of ``columns``, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell_text(row.get(column)) for column in columns] for row in rows)
    return buffer.getvalue()


def lists_to_csv(header: list[str], rows: list[list]) -> str:
    """The CSV text of ``rows`` given as lists in the order of ``header``."""
    return rows_to_csv([dict(zip(header, row)) for row in rows], header)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (e.g. a pretraining run's ``log.jsonl``), one dict per line.

    A line that is not a whole JSON object is left out: a process killed while appending leaves its last
    line cut short, and the records before it are still good.
    """
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
