"""``fmct predict``: a detector on new scans, each planned and read in memory as ``fmct ingest`` reads it.

The PATHs (DICOM folders, DICOM files, NIfTI files) are planned as ``fmct ingest`` plans its sources
(:func:`fmct.scans.plan_scans`, with the detector's recorded selection rules), and each scan is read and
resampled to the canonical grid the detector was trained on (:func:`fmct.scans.read_canonical`); nothing
is written to a store. Reader processes (ingest's crash-isolated :class:`fmct.scans.WorkerPool`, one
thread each) prepare scans ahead of the model: a reader that dies (a native crash in a decoder, out of
memory) costs its scan only, which gets its reason in ``errors.csv`` as in ingest. The detector scores the
scans in batches on the device (CUDA with bf16 autocast when present, else the CPU in fp32).

Scans are named by pseudonym, never by a path or a header value: ``scan_id`` is the keyed pseudonym of
the series UID (of the resolved file path for NIfTI) under the pseudonym key (:mod:`fmct.pseudonym`:
``--key FILE``, else ``$FMCT_KEY_FILE``, else ``~/.config/fmct/pseudonym.key``), exactly as ingest names
a scan, so a scan also ingested under that key has the same id as in the store. ``input`` is the
position (1, 2, ...) of the PATH it came from; a reason names a file by the pseudonym of its path.

Outputs in ``OUT``:

- ``predictions.csv``: one row per scan and finding: ``scan_id, input, finding, probability`` (calibrated,
  in [0, 1]), ``score`` (the logit), and per operating point of the detector (``spec90``, ``spec95``:
  thresholds set on the validation split) ``threshold_<point>`` (a probability) and ``positive_<point>``
  (1 when probability >= threshold, so a decision follows from the columns beside it); with
  ``--saliency`` also the heatmap peak in RAS mm and the paths of its files.
- ``predict.json``: the detector (by a path relative to ``OUT``, and its fingerprint), the counts, and
  ``warnings``: one line per finding that the detector's validation split could not tell from chance
  (:func:`fmct.detector.unvalidated_findings`), also logged as a warning. ``--require-validated`` refuses
  such a detector instead (exit 2).
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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fmct import detector as detectors
from fmct import saliency
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.config import IngestConfig, save_config
from fmct.data.batches import to_device
from fmct.devices import autocast, default_device
from fmct.errors import UsageError
from fmct.fingerprint import file_sha256, settings_sha256
from fmct.io.nifti import write_nifti
from fmct.io.volume import Volume
from fmct.log import logger
from fmct.paths import relative_to
from fmct.pseudonym import PseudonymKey, load_key
from fmct.scans import ScanJob, ScanResult, WorkerPool, died, failed, plan_scans, read_canonical
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
    require_validated: bool = False  # refuse a detector with a finding its validation split cannot tell from chance

    def __post_init__(self) -> None:
        if min(self.batch_size, self.workers, self.saliency_steps) < 1 or self.saliency_sigma_mm < 0:
            raise UsageError("batch_size, workers and saliency_steps must be at least 1, saliency_sigma_mm at least 0")


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
        lines = [
            f"predict: {self.n_scans} scans ({self.n_reused} reused) in {self.seconds:.1f} s -> "
            f"{self.out / 'predictions.csv'}"
        ]
        if self.errors:
            lines.append(f"  skipped {len(self.errors)} inputs or scans; reasons in {self.out / 'errors.csv'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- the readers
def _read_job(job: ScanJob, config: IngestConfig, key: PseudonymKey) -> tuple[Volume, np.ndarray, tuple] | ScanResult:
    """(the scan on the canonical grid: int16 HU and its voxel -> world affine, no identifiers; the source's
    affine and shape, for saliency maps) of ``job``, or the :class:`ScanResult` saying why it cannot be used."""
    try:
        volume, result = read_canonical(job, config)
    except Exception as error:  # a bad scan must never stop the batch, as in ingest
        return failed(job, error, key)
    return Volume(hu=result.hu, affine=result.affine), volume.affine, volume.shape


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
    """Run the detector of ``model`` (a detector folder, or a probe/finetune output:
    :func:`fmct.detector.resolve_detector`, ``fit`` naming one of its fits) on the scans under ``paths``;
    write ``out`` as the module says.

    ``key_file`` is the pseudonym key (:func:`fmct.pseudonym.load_key`). ``device`` defaults to CUDA when available.
    """
    started = time.perf_counter()
    out, device, config = Path(out), default_device(device), config or PredictConfig()
    key = load_key(key_file, outside=out)
    folder = detectors.resolve_detector(model, fit)
    recorded = detectors.read_detector_config(folder)
    warnings = [f"{finding}: {reason}" for finding, reason in detectors.unvalidated_findings(recorded).items()]
    if warnings and config.require_validated:
        raise UsageError(f"{folder}: not validated, refused (--require-validated): {'; '.join(warnings)}")
    for warning in warnings:
        logger.warning(f"predict: WARNING: {warning}; its probabilities are not to be trusted")
    ingest_config = IngestConfig(
        selection=detectors.selection_config(recorded), canonical=detectors.canonical_config(recorded)
    )
    with WorkerPool(partial(_read_job, config=ingest_config, key=key), config.workers) as readers:
        readers.start(config.workers)  # forked before the model (and any CUDA context) exists in this process
        return _predict(folder, readers, ingest_config, paths, out, config, key, device, started, progress, warnings)


def _predict(
    folder: Path,
    readers: WorkerPool,
    ingest_config: IngestConfig,
    paths,
    out: Path,
    config: PredictConfig,
    key: PseudonymKey,
    device: torch.device,
    started: float,
    progress: bool,
    warnings: list[str],
) -> PredictSummary:
    detector = detectors.load_detector(folder, device)
    fingerprint = _detector_fingerprint(folder, detector.config)
    save_config(config, out / "config.yaml")
    plan = plan_scans(list(paths), ingest_config.selection, key)
    jobs = plan.jobs
    errors = [{"input": skipped.input, "scan_id": "", "reason": skipped.reason} for skipped in plan.skipped]
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
    on_death = partial(died, key=key, retry="a re-run tries it again")
    batch = []
    for job, result in readers.run(todo, on_death=on_death, desc="predict", progress=progress):
        if isinstance(result, ScanResult):
            errors.append({"input": job.input, "scan_id": job.scan_id, "reason": result.reason})
        else:
            batch.append((job, *result))
        if len(batch) == config.batch_size:
            records.update(run.batch(batch))
            batch = []
    if batch:
        records.update(run.batch(batch))
    errors.sort(key=lambda error: (error["input"], error["scan_id"]))  # scans finish in any order

    rows = []
    for job in jobs:
        if job.scan_id in records:
            rows += [{**row, "input": job.input} for row in records[job.scan_id]["rows"]]
    summary.n_scans = len(records)
    columns = ["scan_id", "input", "finding", "probability", "score"]
    points = dict.fromkeys(point for finding in detector.findings for point in detector.operating_points(finding))
    columns += [f"{kind}_{point}" for point in points for kind in ("threshold", "positive")]
    columns += SALIENCY_COLUMNS if config.saliency else []
    atomic_write_text(out / "predictions.csv", rows_to_csv(rows, columns))
    atomic_write_text(
        out / "errors.csv", rows_to_csv([{**e, "reason": scrub(e["reason"])} for e in errors], ERROR_COLUMNS)
    )
    atomic_write_text(
        out / "predict.json",
        json.dumps(
            {
                "detector": relative_to(folder, out),
                "detector_fingerprint": fingerprint,
                "findings": detector.findings,
                "warnings": warnings,
                "n_scans": summary.n_scans,
                "n_errors": len(errors),
                "device": str(device),
                "pseudonym_key_fingerprint": key.fingerprint,
            },
            indent=2,
        ),
    )
    summary.seconds = time.perf_counter() - started
    return summary


def _path_scrubber(paths: list[str | os.PathLike]):
    """A function that replaces the given PATHs (as given and resolved) in a reason by ``<input N>``: a
    reader's message may quote a path, and a path may name a patient."""
    spelled = sorted(
        (
            (str(spelling), f"<input {n}>")
            for n, path in enumerate(paths, start=1)
            for spelling in {str(path), str(Path(path).resolve())}
        ),
        key=lambda pair: -len(pair[0]),
    )

    def scrub(reason: str) -> str:
        for text, name in spelled:
            reason = reason.replace(text, name)
        return reason

    return scrub


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

    def __init__(
        self,
        detector: detectors.Detector,
        folder: Path,
        fingerprint: str,
        config: PredictConfig,
        out: Path,
        device: torch.device,
    ):
        self.detector, self.folder, self.fingerprint, self.config, self.out, self.device = (
            detector,
            folder,
            fingerprint,
            config,
            out,
            device,
        )
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
            extra = (
                self._saliency(job, x[b : b + 1], volume, source_affine, source_shape, probabilities[b])
                if self.config.saliency
                else [{} for _ in self.detector.findings]
            )
            rows = []
            for f, finding in enumerate(self.detector.findings):
                row = {
                    "scan_id": job.scan_id,
                    "finding": finding,
                    "probability": float(probabilities[b, f]),
                    "score": float(scores[b, f]),
                    **extra[f],
                }
                for point, values in self.points[finding].items():
                    row[f"threshold_{point}"] = values["threshold"]
                    row[f"positive_{point}"] = int(row["probability"] >= values["threshold"])
                rows.append(row)
            record = {
                "scan_id": job.scan_id,
                "detector": self.fingerprint,
                "saliency": self.config.saliency,
                "rows": rows,
            }
            atomic_write_text(self.out / "scans" / f"{job.scan_id}.json", json.dumps(record))  # last: the scan is done
            records[job.scan_id] = record
        return records

    def _saliency(
        self, job: ScanJob, x: torch.Tensor, volume, source_affine: np.ndarray, source_shape, probabilities: np.ndarray
    ) -> list[dict]:
        """Write the heatmaps of one scan (NIfTI on its source grid, PNG overlay); their columns per finding."""
        with autocast(self.device):
            attributions = saliency.integrated_gradients(
                self.detector, x, self.config.saliency_steps, self.config.batch_size * 4
            )
        maps = saliency.on_canonical_grid(
            attributions, volume.hu.shape, float(volume.spacing_mm[0]), self.config.saliency_sigma_mm
        )
        columns = []
        for f, finding in enumerate(self.detector.findings):
            stem = f"saliency/{job.scan_id}/{finding}"  # the layout fmct report looks for beside predictions
            write_nifti(
                self.out / f"{stem}.nii.gz",
                saliency.to_source_grid(maps[f], volume.affine, source_affine, source_shape),
                source_affine,
            )
            peak = saliency.peak_voxel(maps[f])
            world = volume.affine[:3, :3] @ np.array(peak, dtype=np.float64) + volume.affine[:3, 3]
            title = f"{job.scan_id}  {finding}  p = {probabilities[f]:.2f}"
            atomic_write_bytes(self.out / f"{stem}.png", saliency.overlay_png(volume.hu, maps[f], world, title))
            columns.append(
                {
                    "peak_x_mm": float(world[0]),
                    "peak_y_mm": float(world[1]),
                    "peak_z_mm": float(world[2]),
                    "saliency_nifti": f"{stem}.nii.gz",
                    "saliency_png": f"{stem}.png",
                }
            )
        return columns
