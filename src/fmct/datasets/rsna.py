"""RSNA Intracranial Hemorrhage 2019: per-slice ``stage_2_train.csv`` -> the labels table, one row per series.

The CSV has rows ``ID_<hex>_<type>,<0|1>`` (header ``ID,Label``) for the types of ``SUBTYPES``; the slice
``ID_<hex>`` is the file ``ID_<hex>.dcm`` anywhere under the CSV's folder. The DICOM files there are
grouped into series by ingest's own discovery (SeriesInstanceUID from the headers, pixels not read),
series into studies by StudyInstanceUID, and a study is positive for a finding when any of its slices is
(a slice label given twice counts as positive if either says so). Every series with a labelled slice
gets its study's labels, and as ``source`` the name ingest records for it (``<folder>#<hash>``), so that
``fmct probe --store`` finds its scan. UIDs serve the grouping only and are not returned.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from fmct.datasets.generic import Labels, parse_label
from fmct.errors import InputError
from fmct.io.dicom import discover

SUBTYPES = {
    "epidural": "edh",
    "intraparenchymal": "iph",
    "intraventricular": "ivh",
    "subarachnoid": "sah",
    "subdural": "sdh",
    "any": "ich",
}


def is_rsna(header: list[str]) -> bool:
    """True for the RSNA header ``ID,Label``."""
    return [c.strip() for c in header] == ["ID", "Label"]


def read_slice_labels(path: Path) -> dict[str, dict[str, int]]:
    """Per-slice labels: ``{"ID_<hex>": {finding: 0|1}}`` from the RSNA CSV."""
    slices: dict[str, dict[str, int]] = defaultdict(dict)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            if not is_rsna(header):
                raise InputError(f"{path}: header {header} is not ID,Label")
            for line, cells in enumerate(reader, start=2):
                if not cells:
                    continue
                if len(cells) != 2:
                    raise InputError(f"{path}:{line}: expected ID,Label")
                image, _, subtype = cells[0].strip().rpartition("_")
                if subtype not in SUBTYPES or not image.startswith("ID_"):
                    raise InputError(f"{path}:{line}: {cells[0]!r} is not ID_<hex>_<type> with a known type")
                value = parse_label(cells[1], f"{path}:{line}")
                if value is None:
                    continue
                finding = SUBTYPES[subtype]
                slices[image][finding] = max(value, slices[image].get(finding, 0))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read RSNA labels: {error}") from None
    return slices


def _slice_name(file: Path) -> str:
    return file.name[:-4] if file.name.endswith(".dcm") else file.name


def read_rsna(path: str | os.PathLike) -> Labels:
    """Read the RSNA per-slice CSV and the DICOM headers under its folder into study-level labels per series."""
    path = Path(path)
    slices = read_slice_labels(path)
    series_list, unreadable = discover([path.parent])
    series_list = [info for info in series_list if any(_slice_name(f) in slices for f in info.files)]
    if not series_list:
        raise InputError(f"{path}: no labelled slice has a readable DICOM file under {path.parent}")

    findings = [f for f in SUBTYPES.values() if any(f in labels for labels in slices.values())]
    study_labels: dict[str, dict[str, int]] = defaultdict(dict)
    found = set()
    for info in series_list:
        study = study_labels[info.study_uid]
        for file in info.files:
            found.add(_slice_name(file))
            for finding, value in slices.get(_slice_name(file), {}).items():
                study[finding] = max(value, study.get(finding, 0))
    rows = [
        {
            "scan_id": "",
            "source": info.source,
            "patient_id": "",
            "site": "rsna",
            "split": "",
            **{f: study_labels[info.study_uid].get(f) for f in findings},
        }
        for info in series_list
    ]
    notes = []
    missing = len(set(slices) - found)
    if missing:
        notes.append(f"{missing} of {len(slices)} labelled slices have no DICOM file under {path.parent}")
    if unreadable:
        notes.append(f"{len(unreadable)} DICOM files under {path.parent} have unreadable headers")
    return Labels(rows=rows, findings=findings, origin=str(path), notes=notes)
