"""Write a synthetic cohort to disk as DICOM series or NIfTI files, with labels, masks and previews.

Layouts:
    plain   ``dicom/<case>/IM*.dcm`` (or ``nifti/<case>.nii.gz``), ``labels.csv``, ``masks/<case>.nii.gz``.
    cq500   like the CQ500 release: ``CQ500CT<n> CQ500CT<n>/Unknown Study/CT <series>/`` with a routine, a
            bone-kernel and a thin series per study, and ``reads.csv`` with three readers' calls.
    rsna    like the RSNA 2019 challenge: flat ``stage_2_train/ID_<hex>.dcm`` slices and
            ``stage_2_train.csv`` with rows ``ID_<hex>_<type>,<0|1>``.

Every case is written atomically (a series into a temporary folder renamed into place) and recorded
by ``.cases/<case>.json`` last, so an interrupted run resumes where it stopped; per-scan seeds come from
``(seed, index)``, so the output does not depend on ``workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from fmct.atomic import atomic_write_text
from fmct.datasets.rsna import SUBTYPES
from fmct.errors import UsageError
from fmct.io.dicom_write import write_series
from fmct.io.nifti import write_nifti
from fmct.log import progress_bar
from fmct.synth.pathology import BITS, FINDINGS
from fmct.synth.sites import SITES, SiteProfile
from fmct.synth.subject import Subject, SyntheticScan
from fmct.tables import lists_to_csv

SETTINGS_FILE = "synth.json"  # beside labels.csv: how the cohort was drawn, and that it is synthetic


def made_by_synth(labels_path: str | os.PathLike) -> bool:
    """True when a labels file is one ``fmct synth`` wrote (its cohort's settings lie beside it): the
    scans behind it are synthetic, and what is measured on them says nothing about real CT."""
    return (Path(labels_path).parent / SETTINGS_FILE).is_file()


FORMATS = ("dicom", "nifti")
LAYOUTS = ("plain", "cq500", "rsna")
HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT stores
RSNA_TYPES = SUBTYPES  # the RSNA layout's subtype columns, as its reader maps them
CQ500_SERIES = {"routine": "CT PLAIN", "bone": "CT BONE", "thin": "CT PLAIN THIN"}
CQ500_READS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
_FIRST_NAMES = ("Alex", "Sam", "Robin", "Kim", "Jordan", "Maria", "Chen", "Amir", "Ines", "Olu", "Priya", "Lars")
_LAST_NAMES = ("Miller", "Garcia", "Nguyen", "Okafor", "Schmidt", "Rossi", "Tanaka", "Kowalski", "Haddad", "Silva")


@dataclass
class CohortSummary:
    """What :func:`generate_cohort` did: cases written now, cases found from an earlier run, the folder."""

    written: int
    skipped: int
    out: Path

    def describe(self) -> str:
        return (
            f"synth: {self.written} cases written, {self.skipped} already present, labels in {self.out / 'labels.csv'}"
        )


def scan_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a cohort drawn with ``seed`` (independent of the worker running it)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generate_cohort(
    out,
    n: int = 200,
    sites=("A", "B", "C"),
    fmt: str = "dicom",
    layout: str = "plain",
    seed: int = 0,
    workers: int = 1,
    preview: bool = False,
    matrix: int = 512,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> CohortSummary:
    """Generate ``n`` synthetic head CT cases into folder ``out``.

    Args:
        out: output folder (created; an existing one is resumed: cases already written are skipped).
        n: number of cases (studies).
        sites: site names (``SITES``) or profiles; case ``i`` comes from ``sites[i % len(sites)]``.
        fmt: ``"dicom"`` or ``"nifti"`` (the cq500 and rsna layouts are DICOM).
        layout: ``"plain"``, ``"cq500"`` or ``"rsna"`` (module docstring).
        seed: cohort seed; case i uses ``scan_seed(seed, i)``.
        workers: processes generating cases in parallel.
        preview: also write ``preview/<case>.png`` montages.
        matrix: pixels per image side (512 clinically; smaller for quick tests).
        split_fractions: (train, val, test) shares of the ``split`` column of ``labels.csv``: each case
            draws its split from its own seed, so the split depends on nothing but ``seed``, ``n`` and
            these shares (not on the pseudonym key that ingest names patients with).

    Returns:
        A :class:`CohortSummary`. Tables: ``labels.csv`` (source, patient_id, site, split, one 0/1 column
        per finding), ``cases.jsonl`` (age, sex, midline shift in mm, lesion volumes in ml, acquisition),
        ``masks/bits.json`` (the bit of each finding in the mask volumes), and the layout's own tables.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout != "plain" and fmt != "dicom":
        raise UsageError(f"the {layout} layout is DICOM only (drop --format nifti)")
    if n < 1 or matrix < 16 or workers < 1:
        raise UsageError("n and workers must be at least 1 and matrix at least 16")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise UsageError(f"split shares {split_fractions}: three shares (train, val, test) summing to 1")
    profiles = [SITES[s] if isinstance(s, str) else s for s in sites]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "n": n,
        "sites": [p.name for p in profiles],
        "format": fmt,
        "layout": layout,
        "seed": seed,
        "matrix": matrix,
        "split_fractions": list(split_fractions),
    }
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=1))
    done_folder = out / ".cases"
    todo = [i for i in range(n) if not (done_folder / f"{_case_id(i)}.json").exists()]
    jobs = [(out, i, scan_seed(seed, i), profiles[i % len(profiles)], fmt, layout, preview, matrix) for i in todo]
    progress = progress_bar(total=len(jobs), desc="synth", unit="case")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _write_case(*job)
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_write_case_job, jobs):
                progress.update()
    progress.close()
    records = [json.loads((done_folder / f"{_case_id(i)}.json").read_text()) for i in range(n)]
    for i, record in enumerate(records):  # decided here, so that a resumed cohort takes the shares given now
        record["split"] = _split(scan_seed(seed, i), split_fractions)
    _write_tables(out, records, layout)
    return CohortSummary(written=len(jobs), skipped=n - len(jobs), out=out)


# ----------------------------------------------------------------------------------------- one case
def _case_id(index: int) -> str:
    return f"synth{index:05d}"


def _write_case_job(job: tuple) -> None:
    _write_case(*job)


def _write_case(
    out: Path, index: int, seed: int, site: SiteProfile, fmt: str, layout: str, preview: bool, matrix: int
) -> None:
    """Generate case ``index`` and write its series, mask and preview; record it in ``.cases/`` last."""
    case = _case_id(index)
    subject = Subject(seed, site)
    identity = _identity(subject, index)
    series_names = ("routine", "bone", "thin") if layout == "cq500" else ("routine",)
    record: dict = {"case": case, "site": site.name, "patient_id": identity["PatientID"], "series": []}
    for series_number, series in enumerate(series_names, start=1):
        scan = subject.scan(subject.acquisition(series, matrix), series)
        tags = _tags(subject, scan, identity, series, series_number)
        if layout == "cq500":
            folder = f"CQ500CT{index} CQ500CT{index}/Unknown Study/{CQ500_SERIES[series]}"
            _write_dicom_folder(out / folder, scan, tags, site)
            source = folder
        elif layout == "rsna":
            record["rsna"] = _write_rsna(out / "stage_2_train", scan, tags, site)
            source = f"stage_2_train/{tags['SeriesInstanceUID']}"
        elif fmt == "dicom":
            source = f"dicom/{case}"
            _write_dicom_folder(out / source, scan, tags, site)
        else:
            source = f"nifti/{case}.nii.gz"
            write_nifti(out / source, _stored_hu(scan).astype(np.int16), scan.affine)
        record["series"].append({"source": source, "series": series, "labels": scan.labels, **_acquisition_facts(scan)})
        if series == "routine":
            record.update(labels=scan.labels, info=scan.info, volumes_ml=_volumes_ml(scan))
            write_nifti(out / "masks" / f"{case}.nii.gz", scan.bits, scan.affine)
            if preview:
                from fmct.synth.preview import write_preview

                write_preview(scan, out / "preview" / f"{case}.png", title=f"{case} site {site.name}")
    if layout == "cq500":
        record["reads"] = _reader_calls(record, subject, np.random.default_rng([seed, 9]))
    atomic_write_text(out / ".cases" / f"{case}.json", json.dumps(record))


def _identity(subject: Subject, index: int) -> dict:
    """Fake but realistic patient and study identifiers (ingest must pseudonymise them)."""
    rng = np.random.default_rng([subject.seed, 5])
    birth_year = 2026 - int(subject.age)
    study_uid = generate_uid(entropy_srcs=[str(subject.seed), "study"])
    return {
        "PatientName": f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}",
        "PatientID": f"MRN{rng.integers(10**6, 10**7)}",
        "PatientBirthDate": f"{birth_year}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "PatientSex": subject.sex,
        "PatientAge": f"{int(subject.age):03d}Y",
        "StudyInstanceUID": study_uid,
        "AccessionNumber": f"ACC{rng.integers(10**7, 10**8)}",
        "StudyDate": f"2025{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "StudyTime": f"{rng.integers(0, 24):02d}{rng.integers(0, 60):02d}00",
        "StudyID": str(index + 1),
    }


def _split(seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of the case drawn from ``seed``, with (train, val, test) shares ``fractions``."""
    draw = np.random.default_rng([seed, 7]).random()
    return "train" if draw < fractions[0] else "val" if draw < fractions[0] + fractions[1] else "test"


def _tags(subject: Subject, scan: SyntheticScan, identity: dict, series: str, number: int) -> dict:
    site = subject.site
    acq = scan.acquisition
    return {
        **identity,
        "SeriesInstanceUID": generate_uid(entropy_srcs=[identity["StudyInstanceUID"], series]),
        "SeriesNumber": number,
        "SeriesDescription": {"routine": "HEAD ROUTINE", "bone": "HEAD BONE", "thin": "HEAD THIN"}[series],
        "StudyDescription": "CT HEAD WITHOUT CONTRAST",
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "InstitutionName": site.institution,
        "KVP": f"{site.kvp:g}",
        "ConvolutionKernel": acq.kernel_name,
        "WindowCenter": "600" if series == "bone" else "40",
        "WindowWidth": "2800" if series == "bone" else "80",
    }


def _stored_hu(scan: SyntheticScan) -> np.ndarray:
    return np.clip(np.rint(scan.hu), *HU_RANGE)


def _write_dicom_folder(folder: Path, scan: SyntheticScan, tags: dict, site: SiteProfile) -> None:
    """Write the series into a temporary sibling folder, then rename it into place."""
    temporary = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    write_series(temporary, _stored_hu(scan), scan.affine, tags=tags, rescale=site.rescale)
    shutil.rmtree(folder, ignore_errors=True)  # a case rewritten after an interruption
    os.replace(temporary, folder)


def _write_rsna(folder: Path, scan: SyntheticScan, tags: dict, site: SiteProfile) -> list[list]:
    """Write the series as flat ``ID_<hex>.dcm`` slices; return its per-slice label rows."""
    temporary = folder.parent / f".rsna.{tags['SeriesInstanceUID']}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    paths = write_series(temporary, _stored_hu(scan), scan.affine, tags=tags, rescale=site.rescale, file_names="uid")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, path in enumerate(paths):
        slice_id = "ID_" + hashlib.sha1(path.name.encode()).hexdigest()[:9]
        os.replace(path, folder / f"{slice_id}.dcm")
        present = int(np.bitwise_or.reduce(scan.bits[:, :, k], axis=None))
        rows.extend([f"{slice_id}_{name}", int(bool(present & BITS[f]))] for name, f in RSNA_TYPES.items())
    shutil.rmtree(temporary, ignore_errors=True)
    return rows


def _acquisition_facts(scan: SyntheticScan) -> dict:
    acq = scan.acquisition
    return {
        "thickness_mm": acq.thickness_mm,
        "pixel_mm": round(acq.pixel_mm, 4),
        "n_slices": acq.n_slices,
        "tilt_deg": round(acq.tilt_deg, 3),
        "kernel": acq.kernel_name,
        "noise_hu": round(acq.noise_hu, 2),
    }


def _volumes_ml(scan: SyntheticScan) -> dict:
    """Mask volume (ml) of every finding present in the series."""
    voxel_ml = float(abs(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
    values, counts = np.unique(scan.bits[scan.bits != 0], return_counts=True)
    volumes = {}
    for finding in FINDINGS:
        count = int(counts[(values & BITS[finding]) != 0].sum())
        if count:
            volumes[finding] = round(count * voxel_ml, 3)
    return volumes


def _reader_calls(record: dict, subject: Subject, rng: np.random.Generator) -> dict:
    """Three readers' CQ500 calls: the truth, with misses of small findings and a few false alarms."""
    labels, volumes = record["labels"], record["volumes_ml"]
    lesions = record["info"]["lesions"]
    bleeding_sides = {lesion["side"] for lesion in lesions if lesion["finding"] in RSNA_TYPES.values()}
    truth = {
        "ICH": labels["ich"],
        "IPH": labels["iph"],
        "IVH": labels["ivh"],
        "SDH": labels["sdh"],
        "EDH": labels["edh"],
        "SAH": labels["sah"],
        "BleedLocation-Left": int(labels["ich"] and bool(bleeding_sides & {-1, 0})),
        "BleedLocation-Right": int(labels["ich"] and bool(bleeding_sides & {1, 0})),
        "ChronicBleed": int(labels["sdh"] and any(lesion["subtype"] == "chronic" for lesion in lesions)),
        "Fracture": labels["fracture"],
        "CalvarialFracture": labels["fracture"],
        "OtherFracture": 0,
        "MassEffect": int(labels["mass"] or labels["midline_shift"]),
        "MidlineShift": labels["midline_shift"],
    }
    volume_of = {
        "ICH": "ich",
        "IPH": "iph",
        "IVH": "ivh",
        "SDH": "sdh",
        "EDH": "edh",
        "SAH": "sah",
        "Fracture": "fracture",
        "CalvarialFracture": "fracture",
        "MidlineShift": "midline_shift",
    }
    calls = {}
    for reader in ("R1", "R2", "R3"):
        for name in CQ500_READS:
            value = truth[name]
            if value:
                volume = volumes.get(volume_of.get(name, ""), 10.0)
                miss = 0.03 + 0.35 * np.exp(-volume / 1.5)  # subtle findings are missed more often
                value = int(rng.random() >= miss)
            elif rng.random() < 0.02:
                value = 1
            calls[f"{reader}:{name}"] = value
    return calls


# ------------------------------------------------------------------------------------------- tables
def _write_tables(out: Path, records: list[dict], layout: str) -> None:
    """labels.csv, cases.jsonl, masks/bits.json and the layout's reads.csv or stage_2_train.csv."""
    header = ["source", "patient_id", "site", "split", *FINDINGS]
    rows = []
    for record in records:
        for series in record["series"]:
            labels = series["labels"]
            rows.append(
                [
                    series["source"],
                    record["patient_id"],
                    record["site"],
                    record["split"],
                    *(labels[f] for f in FINDINGS),
                ]
            )
    atomic_write_text(out / "labels.csv", lists_to_csv(header, rows))
    atomic_write_text(out / "cases.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_text(out / "masks" / "bits.json", json.dumps(BITS, indent=1))
    if layout == "cq500":
        index = [int(r["case"][5:]) for r in records]
        read_rows = [
            [
                f"CQ500-CT-{i}",
                "B1",
                *(r["reads"][f"{reader}:{name}"] for reader in ("R1", "R2", "R3") for name in CQ500_READS),
            ]
            for i, r in zip(index, records)
        ]
        read_header = [
            "name",
            "Category",
            *(f"{reader}:{name}" for reader in ("R1", "R2", "R3") for name in CQ500_READS),
        ]
        atomic_write_text(out / "reads.csv", lists_to_csv(read_header, read_rows))
    if layout == "rsna":
        atomic_write_text(
            out / "stage_2_train.csv", lists_to_csv(["ID", "Label"], [row for r in records for row in r["rsna"]])
        )
