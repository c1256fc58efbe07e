"""``fmct embed``: the features of every scan of a store under a backbone, as an embeddings table.

Per scan: the whole canonical volume resized to the model's input size and windowed into channels
(:func:`fmct.data.embed_transform`, with the HU windows recorded with the model or the defaults), one
forward pass, then the CLS token and the mean of the patch tokens (the probe builds ``concat``).

Data path: reader threads copy int16 volumes out of the store's memory-mapped files straight into one
host buffer per batch (pinned on CUDA); the CPU touches bytes only. On the device: to float, resize,
windows, forward (bf16 autocast on CUDA, fp32 on CPU). On CUDA the host-to-device copy of the next batch
runs on its own stream, under the forward of the current one.

Resume: scans are processed in chunks of ``chunk_size`` (rounded up to a multiple of the batch). Each
finished chunk is written atomically to ``EMB/chunks/chunk-NNNNN.npz`` with the fingerprint of the model
and settings that made it; a re-run reuses every chunk whose scans and fingerprint match, then assembles
``embeddings.npz`` + ``embeddings.json`` (:mod:`fmct.eval.embeddings`), ``errors.csv`` (scans skipped,
with the reason) and ``config.yaml``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fmct import hub
from fmct.config import save_config
from fmct.data import DEFAULT_WINDOWS, StoreVolumes, embed_transform
from fmct.eval.embeddings import write_embeddings
from fmct.eval.evaluate import rows_to_csv
from fmct.eval.probe import file_sha256
from fmct.models import ViT3D
from fmct.store import atomic_write_bytes, atomic_write_text


@dataclass
class EmbedConfig:
    batch_size: int = 32
    workers: int = 4  # reader threads copying volumes out of the store
    chunk_size: int = 1024  # scans per resumable chunk file (rounded up to a multiple of batch_size)
    compile: bool = False  # torch.compile the forward pass (pays off on CUDA for large stores)
    arm: str = "pretrained"  # written to the table's meta; the probe copies it into its predictions
    model_name: str = ""  # empty: the model folder's name (the run's name for RUN/backbone)


@dataclass
class EmbedSummary:
    out: Path
    n_embedded: int
    n_chunks: int
    n_chunks_reused: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        line = (f"embed: {self.n_embedded} scans in {self.seconds:.1f} s -> {self.out / 'embeddings.npz'}"
                f" ({self.n_chunks_reused} of {self.n_chunks} chunks reused)")
        if self.skipped:
            line += f"\n  skipped {len(self.skipped)} scans, reasons in {self.out / 'errors.csv'}"
        return line


# ------------------------------------------------------------------------------------ model input
def model_windows(model_dir: str | os.PathLike) -> list[tuple[float, float]]:
    """The (level, width) HU windows a model was trained with: ``extra["windows"]`` of its ``config.json``
    (as ``fmct pretrain`` records them), or :data:`fmct.data.DEFAULT_WINDOWS` when none was recorded."""
    recorded = hub.read_extra(model_dir).get("windows")
    if recorded is None:
        return list(DEFAULT_WINDOWS)
    try:
        windows = [(float(level), float(width)) for level, width in recorded]
    except (TypeError, ValueError):
        windows = []
    if not windows or any(width <= 0 for _, width in windows):
        raise hub.CheckpointError(f"{Path(model_dir) / hub.CONFIG_FILE}: extra.windows must be a list of [level, width] HU with width > 0")
    return windows


def model_name(model_dir: Path) -> str:
    """A readable name for a model folder: the run's name for ``RUN/backbone``, else the folder's."""
    return model_dir.parent.name if model_dir.name == "backbone" else model_dir.name


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; disabled (fp32) elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def encode(
    model: ViT3D, hu: torch.Tensor, windows: Sequence[tuple[float, float]],
    forward_features: Callable[[torch.Tensor], dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS token and mean patch token, each float32 (B, embed_dim), of HU volumes (B, 1, X, Y, Z).

    ``hu`` lies on the model's device; each volume is resized whole to the model's ``img_size`` and
    windowed into channels (:func:`fmct.data.embed_transform`). ``forward_features`` replaces the
    model's own (e.g. a compiled one).
    """
    x = embed_transform(hu, model.config.img_size, windows)
    with autocast(x.device):
        tokens = (forward_features or model.forward_features)(x)
    return tokens["cls"].float(), tokens["patch"].float().mean(dim=1)


# ---------------------------------------------------------------------------------------- reading
class HuBatch(NamedTuple):
    """``hu`` int16 (B, 1, X, Y, Z) on the host; ``indices`` its dataset indices; ``failed`` maps a row
    that could not be read to the reason (its values in ``hu`` are meaningless)."""

    hu: torch.Tensor
    indices: list[int]
    failed: dict[int, str]


def _read_into(volumes: StoreVolumes, index: int, out: np.ndarray) -> str | None:
    scan_id = volumes.scan_ids[index]
    path = volumes.store.path / "scans" / f"{scan_id}.npy"
    try:
        hu, _ = volumes.store[scan_id]
        if hu.dtype != np.int16 or hu.shape != volumes.shape:
            return f"{path}: expected int16 {list(volumes.shape)}, found {hu.dtype} {list(hu.shape)}"
        np.copyto(out, hu)
    except (OSError, ValueError) as error:
        return f"{path}: cannot read: {error}"
    return None


def read_hu_batches(
    volumes: StoreVolumes, batches: Iterable[Sequence[int]], workers: int = 4, pin_memory: bool = False, prefetch: int = 2,
) -> Iterator[HuBatch]:
    """The int16 HU volumes of each batch of dataset indices, read ``prefetch`` batches ahead.

    Threads, not worker processes: numpy's copy releases the GIL, and a thread writes straight into
    the batch's (pinned) buffer, where a worker process would add two copies of every volume (into
    shared memory, then into pinned memory). A scan that cannot be read is reported in ``failed``,
    not raised. Close the iterator (or exhaust it) to stop the threads.
    """
    executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fmct-read")

    def submit(batch: Sequence[int]):
        hu = torch.empty((len(batch), 1, *volumes.shape), dtype=torch.int16, pin_memory=pin_memory)
        rows = hu.numpy()
        return hu, list(batch), [executor.submit(_read_into, volumes, i, rows[row, 0]) for row, i in enumerate(batch)]

    batches = iter(batches)
    pending = deque(submit(batch) for batch in itertools.islice(batches, prefetch + 1))
    try:
        while pending:
            hu, indices, futures = pending.popleft()
            failed = {row: reason for row, future in enumerate(futures) if (reason := future.result()) is not None}
            following = next(batches, None)
            if following is not None:
                pending.append(submit(following))
            yield HuBatch(hu, indices, failed)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def to_device(hu: torch.Tensor, device: torch.device, copy_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """``hu`` on ``device``; on CUDA with ``copy_stream`` the copy runs on that stream, so it overlaps
    the kernels already queued, and the current stream waits for it before using the result."""
    if copy_stream is None:
        return hu.to(device)
    with torch.cuda.stream(copy_stream):
        on_device = hu.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(copy_stream)
    on_device.record_stream(current)  # the allocator must not recycle it before the forward has read it
    return on_device


# ----------------------------------------------------------------------------------------- chunks
def _load_chunk(path: Path, expected_ids: list[str], fingerprint: str) -> dict[str, np.ndarray] | None:
    """A finished chunk's arrays, or None when the file is missing, unreadable, stale or of other scans."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        done = arrays["scan_id"].tolist() + arrays["failed_scan_id"].tolist()
    except (OSError, ValueError, EOFError, KeyError):
        return None
    if str(arrays.get("fingerprint")) != fingerprint or sorted(done) != sorted(expected_ids):
        return None
    return arrays


def _save_chunk(path: Path, scan_ids: list[str], cls: np.ndarray, patch_mean: np.ndarray,
                failed: list[tuple[str, str]], fingerprint: str) -> dict[str, np.ndarray]:
    arrays = {
        "scan_id": np.asarray(scan_ids, dtype=str).reshape(-1),
        "cls": cls.astype(np.float32),
        "patch_mean": patch_mean.astype(np.float32),
        "failed_scan_id": np.asarray([s for s, _ in failed], dtype=str).reshape(-1),
        "failed_reason": np.asarray([r for _, r in failed], dtype=str).reshape(-1),
        "fingerprint": np.asarray(fingerprint),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return arrays


# -------------------------------------------------------------------------------------------- run
def embed_store(
    model_path: str | os.PathLike,
    store_path: str | os.PathLike,
    out: str | os.PathLike,
    config: EmbedConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every scan of the store at ``store_path`` with the backbone at ``model_path`` (a model folder
    or a pretraining run) into the embeddings folder ``out``; resumes from the finished chunks there.

    ``device`` defaults to CUDA when available, else the CPU. Raises :class:`fmct.hub.CheckpointError`
    for a bad model folder and ValueError / FileNotFoundError for a bad or empty store.
    """
    started = time.perf_counter()
    config = config or EmbedConfig()
    if config.batch_size < 1 or config.chunk_size < 1:
        raise ValueError(f"batch_size ({config.batch_size}) and chunk_size ({config.chunk_size}) must be at least 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    model_dir = hub.resolve_model_dir(model_path)
    model = hub.load(model_dir, device)
    windows = model_windows(model_dir)
    checkpoint_sha256 = file_sha256(model_dir / hub.WEIGHTS_FILE)
    volumes = StoreVolumes(store_path)
    precision = "bf16" if device.type == "cuda" else "fp32"
    fingerprint = json.dumps({
        "checkpoint_sha256": checkpoint_sha256, "windows_hu": windows, "input_size": list(model.config.img_size),
        "store_shape": list(volumes.shape), "precision": precision,
    }, sort_keys=True)

    chunk_scans = math.ceil(config.chunk_size / config.batch_size) * config.batch_size
    chunks = [range(start, min(start + chunk_scans, len(volumes))) for start in range(0, len(volumes), chunk_scans)]
    chunk_paths = [out / "chunks" / f"chunk-{k:05d}.npz" for k in range(len(chunks))]
    finished = {}
    for k, chunk in enumerate(chunks):
        arrays = _load_chunk(chunk_paths[k], [volumes.scan_ids[i] for i in chunk], fingerprint)
        if arrays is not None:
            finished[k] = arrays
    n_reused = len(finished)

    # Batches never straddle two chunks; plan[b] = (chunk of batch b, whether it closes the chunk).
    batches, plan = [], []
    for k, chunk in enumerate(chunks):
        if k in finished:
            continue
        starts = range(0, len(chunk), config.batch_size)
        batches += [list(chunk[s : s + config.batch_size]) for s in starts]
        plan += [(k, s == starts[-1]) for s in starts]

    forward_features = torch.compile(model.forward_features) if config.compile else model.forward_features
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    bar = tqdm(total=len(volumes), initial=sum(len(chunks[k]) for k in finished), unit="scan", desc="embed",
               disable=not progress)
    reader = read_hu_batches(volumes, batches, config.workers, pin_memory=device.type == "cuda")
    try:
        cls_parts, mean_parts, ids, failed = [], [], [], []
        for (k, closes_chunk), batch in zip(plan, reader):
            cls, patch_mean = encode(model, to_device(batch.hu, device, copy_stream), windows, forward_features)
            keep = [row for row in range(len(batch.indices)) if row not in batch.failed]
            # Results stay on the device until the chunk closes: one synchronisation per chunk, not per batch.
            cls_parts.append(cls[keep] if batch.failed else cls)
            mean_parts.append(patch_mean[keep] if batch.failed else patch_mean)
            ids += [volumes.scan_ids[batch.indices[row]] for row in keep]
            failed += [(volumes.scan_ids[batch.indices[row]], reason) for row, reason in batch.failed.items()]
            bar.update(len(batch.indices))
            if closes_chunk:
                finished[k] = _save_chunk(chunk_paths[k], ids, torch.cat(cls_parts).cpu().numpy(),
                                          torch.cat(mean_parts).cpu().numpy(), failed, fingerprint)
                cls_parts, mean_parts, ids, failed = [], [], [], []
    finally:
        reader.close()
        bar.close()

    ordered = [finished[k] for k in range(len(chunks))]
    scan_ids = np.concatenate([arrays["scan_id"] for arrays in ordered])
    skipped = list(volumes.skipped) + [
        (s, r) for arrays in ordered for s, r in zip(arrays["failed_scan_id"].tolist(), arrays["failed_reason"].tolist())
    ]
    if len(scan_ids) == 0:
        raise ValueError(f"{volumes.store.path}: no scan could be read (first reason: {skipped[0][1]})")
    meta = {
        "model": config.model_name or model_name(model_dir),
        "arm": config.arm,
        "model_path": str(model_dir.resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "model_config": hub.read_config_json(model_dir)["config"],
        "input_size": list(model.config.img_size),
        "windows_hu": [list(w) for w in windows],
        "store": str(volumes.store.path.resolve()),
        "n_scans": int(len(scan_ids)),
        "n_skipped": len(skipped),
        "precision": precision,
    }
    features = {name: np.concatenate([arrays[name] for arrays in ordered]) for name in ("cls", "patch_mean")}
    write_embeddings(out, scan_ids, features, meta)
    atomic_write_text(out / "errors.csv", rows_to_csv([{"scan_id": s, "reason": r} for s, r in skipped], ["scan_id", "reason"]))
    save_config(config, out / "config.yaml")
    return EmbedSummary(out, len(scan_ids), len(chunks), n_reused, time.perf_counter() - started, skipped)
