"""``fmct predict``: a detector on new scans, each read through ingest's own path in memory.

Each PATH (a DICOM folder, DICOM files, NIfTI files) is discovered and its series selected as ``fmct
ingest`` does (:func:`fmct.io.discover`, :func:`fmct.io.select_series` with the detector's recorded
selection rules), read (:func:`fmct.io.read_series`, :func:`fmct.io.read_nifti`) and resampled to the
canonical grid the detector was trained on (:func:`fmct.preprocess.canonical`); nothing is written to a
store. Reader processes prepare scans ahead of the model (one thread each, as ingest's); the detector
scores them in batches on the device (CUDA with bf16 autocast when present, else the CPU in fp32).

Scans are named by pseudonym, never by a path or a header value: ``scan_id`` is the keyed pseudonym of
the series UID (of the resolved file path for NIfTI) under the pseudonym key (:mod:`fmct.pseudonym`:
``--key FILE``, else ``$FMCT_KEY_FILE``, else ``~/.config/fmct/pseudonym.key``), exactly as ingest names
a scan, so a scan also ingested under that key has the same id as in the store. ``input`` is the
position (1, 2, ...) of the PATH it came from; a reason names a file by the pseudonym of its path.

Outputs in ``OUT``:

- ``predictions.csv``: one row per scan and finding: ``scan_id, input, finding, probability`` (calibrated,
  in [0, 1]), ``score`` (the logit), and per operating point of the detector (``spec90``, ``spec95``:
  thresholds set on the validation split) ``threshold_<point>`` (in probability) and ``positive_<point>``
  (1 when score >= the point's score threshold); with ``--saliency`` also the heatmap peak in RAS mm and
  the paths of its files.
- ``errors.csv``: ``input, scan_id, reason``: one line per input or scan that could not be used; the
  others go on.
- ``saliency/<scan_id>/<finding>.nii.gz`` (the heatmap on the source scan's own grid and affine) and
  ``.png`` (axial, coronal, sagittal through its peak), with ``--saliency`` (:mod:`fmct.saliency`:
  Integrated Gradients, logit per voxel).
- ``scans/<scan_id>.json``: each finished scan's rows; a re-run with the same detector reuses them
  (a killed run resumes), and rebuilds the tables.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fmct import detector as detectors
from fmct import saliency
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.config import IngestConfig, save_config
from fmct.data.batches import to_device
from fmct.devices import autocast, default_device, setup_volume_worker
from fmct.errors import FileScanError, ScanError, UsageError
from fmct.fingerprint import file_sha256, settings_sha256
from fmct.io import discover, is_nifti, read_nifti, read_series, select_series
from fmct.io.dicom import walk_files
from fmct.io.nifti import write_nifti
from fmct.io.volume import Volume
from fmct.preprocess import canonical
from fmct.pseudonym import PseudonymKey, load_key, scrubbed_reason
from fmct.tables import rows_to_csv

ERROR_COLUMNS = ["input", "scan_id", "reason"]
SALIENCY_COLUMNS = ["peak_x_mm", "peak_y_mm", "peak_z_mm", "saliency_nifti", "saliency_png"]


@dataclass
class PredictConfig:
    batch_size: int = 4  # scans per forward pass
    workers: int = 2  # processes reading and resampling scans ahead of the model
    saliency: bool = False  # write a heatmap per scan and finding (Integrated Gradients, fmct.saliency)
    saliency_steps: int = 16  # steps along the Integrated Gradients path (forward + backward passes per scan)
    saliency_sigma_mm: float = 8.0  # Gaussian smoothing (mm) of the heatmap on the canonical grid: a bleed is a region

    def __post_init__(self) -> None:
        if min(self.batch_size, self.workers, self.saliency_steps) < 1 or self.saliency_sigma_mm < 0:
            raise UsageError("batch_size, workers and saliency_steps must be at least 1, saliency_sigma_mm at least 0")


@dataclass
class ScanJob:
    """One scan to predict: its pseudonym, the position of the PATH it came from (1, 2, ...), and what
    the reader reads (a discovered DICOM series, or a NIfTI file)."""

    scan_id: str
    input: int
    source: object


@dataclass
class PredictSummary:
    out: Path
    n_scans: int = 0
    n_reused: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False only when inputs were given and no scan could be predicted."""
        return self.n_scans > 0 or not self.errors

    def describe(self) -> str:
        lines = [f"predict: {self.n_scans} scans ({self.n_reused} reused) in {self.seconds:.1f} s -> "
                 f"{self.out / 'predictions.csv'}"]
        if self.errors:
            lines.append(f"  skipped {len(self.errors)} inputs or scans; reasons in {self.out / 'errors.csv'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- the inputs
def plan_scans(paths: list[str | os.PathLike], selection, key: PseudonymKey) -> tuple[list[ScanJob], list[dict]]:
    """The scans under ``paths`` as ``fmct ingest`` finds them (the DICOM files of all PATHs discovered
    together, so a series given file by file is one scan; series selected by ``selection``; NIfTI files),
    each once and attributed to the first PATH holding one of its files, and an error row per input or
    series not used."""
    errors, input_of = [], {}
    for ordinal, path in enumerate(paths, start=1):
        if not Path(path).exists():
            errors.append({"input": ordinal, "scan_id": "", "reason": "no such file or folder"})
            continue
        found = walk_files([path])
        if not found:
            errors.append({"input": ordinal, "scan_id": "", "reason": "no DICOM series or NIfTI file found here"})
        for file in found:  # a file under two PATHs belongs to the first
            input_of.setdefault(str(file), ordinal)
    files = [Path(f) for f in input_of]
    series, unreadable = discover([f for f in files if not is_nifti(f)])
    kept, rejected = select_series(series, selection)
    why_rejected, kept_ids = dict(rejected), {id(info) for info in kept}
    jobs, used = [], set()
    for info in series:
        ordinal = min(input_of.get(str(f), len(paths)) for f in info.files)
        if id(info) in kept_ids:
            jobs.append(ScanJob(key.pseudonym("series", info.series_uid), ordinal, info))
        elif info.source in why_rejected:  # (a repeat of a kept series is dropped silently, as in ingest)
            errors.append({"input": ordinal, "scan_id": "", "reason": why_rejected[info.source]})
        used.add(ordinal)
    for file in files:
        if is_nifti(file):
            jobs.append(ScanJob(key.pseudonym("series", str(file.resolve())), input_of[str(file)], file))
            used.add(input_of[str(file)])
    for path, reason in unreadable:
        errors.append({"input": input_of.get(path, 0), "scan_id": "", "reason": reason})
        used.add(input_of.get(path, 0))
    errors += [{"input": ordinal, "scan_id": "", "reason": "no DICOM series or NIfTI file found here"}
               for ordinal in sorted(set(input_of.values()) - used)]
    seen, unique = set(), []
    for job in jobs:  # the same scan twice (a NIfTI named by two PATHs): kept once
        if job.scan_id not in seen:
            seen.add(job.scan_id)
            unique.append(job)
    return sorted(unique, key=lambda job: job.input), sorted(errors, key=lambda error: error["input"])


def read_canonical(job: ScanJob, config: IngestConfig) -> tuple[Volume, np.ndarray, tuple[int, int, int]]:
    """The scan of ``job`` on the canonical grid (int16 HU, its voxel -> world affine; no identifiers), and
    the source's affine and shape (for saliency maps)."""
    volume = read_nifti(job.source) if isinstance(job.source, Path) else read_series(job.source, config.selection)
    result = canonical(volume, config.canonical)
    return Volume(hu=result.hu, affine=result.affine), volume.affine, volume.shape


def _read_job(job: ScanJob, config: IngestConfig, key: PseudonymKey):
    """(canonical Volume, source affine, source shape) of ``job``, or the one-line reason it cannot be used:
    a file it names by the pseudonym of its path, as ingest's reasons do."""
    try:
        return read_canonical(job, config)
    except FileScanError as error:
        return error.reason if Path(error.path) == job.source else f"file {key.pseudonym('source', str(error.path))}: {error.reason}"
    except ScanError as error:
        return str(error)
    except Exception as error:  # a bad scan must never stop the batch, as in ingest
        return f"unexpected {type(error).__name__}: {scrubbed_reason(error)}"


# ------------------------------------------------------------------------------------------- run
def _detector_fingerprint(folder: Path, config: dict) -> str:
    return settings_sha256({"config": config, "head": file_sha256(folder / detectors.HEAD_FILE)})


def predict(
    model: str | os.PathLike,
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    config: PredictConfig | None = None,
    fit: str | None = None,
    key_file: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Run the detector of ``model`` (a detector folder, or a probe/finetune output: :func:`fmct.detector.resolve_detector`,
    ``fit`` naming one of its fits) on the scans under ``paths``; write ``out`` as the module says.

    ``key_file`` is the pseudonym key (:func:`fmct.pseudonym.load_key`). ``device`` defaults to CUDA when available.
    """
    started = time.perf_counter()
    out, device, config = Path(out), default_device(device), config or PredictConfig()
    key = load_key(key_file, outside=out)
    folder = detectors.resolve_detector(model, fit)
    # The readers fork before the model (and any CUDA context) exists in this process.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context(method), initializer=setup_volume_worker)
    try:
        executor.submit(int).result()  # start the workers now
        return _predict(folder, executor, paths, out, config, key, device, started, progress)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _predict(folder: Path, executor: ProcessPoolExecutor, paths, out: Path, config: PredictConfig, key: PseudonymKey,
             device: torch.device, started: float, progress: bool) -> PredictSummary:
    detector = detectors.load_detector(folder, device)
    ingest_config = IngestConfig(selection=detectors.selection_config(detector.config),
                                 canonical=detectors.canonical_config(detector.config))
    fingerprint = _detector_fingerprint(folder, detector.config)
    save_config(config, out / "config.yaml")
    jobs, errors = plan_scans(list(paths), ingest_config.selection, key)
    scrub = _path_scrubber(paths)

    summary = PredictSummary(out, errors=errors)
    records: dict[str, dict] = {}
    todo = []
    for job in jobs:
        record = _finished(out, job.scan_id, fingerprint, config.saliency)
        if record is None:
            todo.append(job)
        else:
            records[job.scan_id] = record
            summary.n_reused += 1
    run = _Run(detector, folder, fingerprint, config, out, device)
    with tqdm(total=len(todo), unit="scan", desc="predict", disable=not progress or not todo, dynamic_ncols=True) as bar:
        pending = deque()
        batch = []
        queue = iter(todo)
        for job in _take(queue, config.batch_size + config.workers):
            pending.append((job, executor.submit(_read_job, job, ingest_config, key)))
        while pending:
            job, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, executor.submit(_read_job, following, ingest_config, key)))
            result = future.result()
            if isinstance(result, str):
                errors.append({"input": job.input, "scan_id": job.scan_id, "reason": result})
                bar.update()
            else:
                batch.append((job, *result))
            if batch and (len(batch) == config.batch_size or not pending):
                records.update(run.batch(batch))
                bar.update(len(batch))
                batch = []

    rows = []
    for job in jobs:
        if job.scan_id in records:
            rows += [{**row, "input": job.input} for row in records[job.scan_id]["rows"]]
    summary.n_scans = len(records)
    columns = ["scan_id", "input", "finding", "probability", "score"]
    columns += [f"{kind}_{point}" for point in detectors.OPERATING_POINTS for kind in ("threshold", "positive")]
    columns += SALIENCY_COLUMNS if config.saliency else []
    atomic_write_text(out / "predictions.csv", rows_to_csv(rows, columns))
    atomic_write_text(out / "errors.csv", rows_to_csv([{**e, "reason": scrub(e["reason"])} for e in errors], ERROR_COLUMNS))
    atomic_write_text(out / "predict.json", json.dumps({
        "detector": str(folder.resolve()), "detector_fingerprint": fingerprint, "findings": detector.findings,
        "n_scans": summary.n_scans, "n_errors": len(errors), "device": str(device),
        "pseudonym_key_fingerprint": key.fingerprint}, indent=2))
    summary.seconds = time.perf_counter() - started
    return summary


def _path_scrubber(paths: list[str | os.PathLike]):
    """A function that replaces the given PATHs (as given and resolved) in a reason by ``<input N>``: a
    reader's message may quote a path, and a path may name a patient."""
    spelled = sorted(((str(spelling), f"<input {n}>") for n, path in enumerate(paths, start=1)
                      for spelling in {str(path), str(Path(path).resolve())}), key=lambda pair: -len(pair[0]))

    def scrub(reason: str) -> str:
        for text, name in spelled:
            reason = reason.replace(text, name)
        return reason

    return scrub


def _take(iterator, n: int) -> list:
    return [item for _, item in zip(range(n), iterator)]


def _finished(out: Path, scan_id: str, fingerprint: str, with_saliency: bool) -> dict | None:
    """The record of a scan an earlier run finished with the same detector (and saliency, when asked)."""
    path = out / "scans" / f"{scan_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("detector") != fingerprint or (with_saliency and not record.get("saliency")):
        return None
    return record


class _Run:
    """The detector on the device, and what one batch of canonical scans turns into."""

    def __init__(self, detector: detectors.Detector, folder: Path, fingerprint: str, config: PredictConfig,
                 out: Path, device: torch.device):
        self.detector, self.folder, self.fingerprint, self.config, self.out, self.device = (
            detector, folder, fingerprint, config, out, device)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.points = {f: detector.operating_points(f) for f in detector.findings}

    @torch.no_grad()
    def batch(self, items: list[tuple]) -> dict[str, dict]:
        """Score a batch of (job, canonical Volume, source affine, source shape); write each scan's
        record (and saliency files); return {scan_id: record}."""
        hu = torch.from_numpy(np.stack([volume.hu for _, volume, _, _ in items])[:, None])
        hu = to_device(hu.pin_memory() if self.device.type == "cuda" else hu, self.device, self.copy_stream)
        with autocast(self.device):
            x = self.detector.model_input(hu)
            scores = self.detector.scores_of_input(x)
        probabilities = self.detector.calibrated(scores).cpu().numpy()
        scores = scores.cpu().numpy()
        records = {}
        for b, (job, volume, source_affine, source_shape) in enumerate(items):
            extra = self._saliency(job, x[b : b + 1], volume, source_affine, source_shape, probabilities[b]) \
                if self.config.saliency else [{} for _ in self.detector.findings]
            rows = []
            for f, finding in enumerate(self.detector.findings):
                row = {"scan_id": job.scan_id, "finding": finding, "probability": float(probabilities[b, f]),
                       "score": float(scores[b, f]), **extra[f]}
                for point, values in self.points[finding].items():
                    row[f"threshold_{point}"] = values["probability"]
                    row[f"positive_{point}"] = int(scores[b, f] >= values["threshold"])
                rows.append(row)
            record = {"scan_id": job.scan_id, "detector": self.fingerprint, "saliency": self.config.saliency, "rows": rows}
            atomic_write_text(self.out / "scans" / f"{job.scan_id}.json", json.dumps(record))  # last: the scan is done
            records[job.scan_id] = record
        return records

    def _saliency(self, job: ScanJob, x: torch.Tensor, volume, source_affine: np.ndarray, source_shape,
                  probabilities: np.ndarray) -> list[dict]:
        """Write the heatmaps of one scan (NIfTI on its source grid, PNG overlay); their columns per finding."""
        with autocast(self.device):
            attributions = saliency.integrated_gradients(self.detector, x, self.config.saliency_steps, self.config.batch_size * 4)
        maps = saliency.on_canonical_grid(attributions, volume.hu.shape, float(volume.spacing_mm[0]), self.config.saliency_sigma_mm)
        columns = []
        for f, finding in enumerate(self.detector.findings):
            stem = f"saliency/{job.scan_id}/{finding}"  # the layout fmct report looks for beside predictions
            write_nifti(self.out / f"{stem}.nii.gz", saliency.to_source_grid(maps[f], volume.affine, source_affine, source_shape),
                        source_affine)
            peak = saliency.peak_voxel(maps[f])
            world = volume.affine[:3, :3] @ np.array(peak, dtype=np.float64) + volume.affine[:3, 3]
            title = f"{job.scan_id}  {finding}  p = {probabilities[f]:.2f}"
            atomic_write_bytes(self.out / f"{stem}.png", saliency.overlay_png(volume.hu, maps[f], world, title))
            columns.append({"peak_x_mm": float(world[0]), "peak_y_mm": float(world[1]), "peak_z_mm": float(world[2]),
                            "saliency_nifti": f"{stem}.nii.gz", "saliency_png": f"{stem}.png"})
        return columns
