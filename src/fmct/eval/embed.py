"""``fmct embed``: the features of every scan of a store under a backbone, as an embeddings table.

What turns a scan into features (``--model``, see :func:`resolve_encoder`), and the arm it is recorded as:

- ``RUN|DIR``, a pretrained backbone (arm ``pretrained``), or ``scratch --like RUN|DIR``, the same
  architecture randomly initialised from ``init_seed`` and frozen (arm ``random-init``, a floor): the
  whole canonical volume resized to the model's input size and windowed into channels
  (:func:`fmct.models.windows.model_input`, with the HU windows recorded with the (like) model or the defaults),
  one forward pass (bf16 autocast on CUDA, fp32 on the CPU), then float32 features of embed_dim each: the
  CLS token ``cls`` and the mean and per-channel maximum of the patch tokens, ``patch_mean`` and
  ``patch_max`` (:func:`fmct.models.encode.encode`; the probe builds its feature sets from them, by default
  ``auto``);
- ``hu-histogram``: first-order HU features of the canonical volume itself (arm ``hu-histogram``, the
  radiomics floor; :mod:`fmct.eval.radiomics`), one feature ``first_order``.

Data path: reader threads decode int16 volumes from the store's files straight into one host buffer
per batch (pinned on CUDA; blosc2 releases the GIL, so the threads decode in parallel); the CPU touches
bytes only. On the device: to float, resize,
windows, forward (bf16 autocast on CUDA, fp32 on CPU), or the histogram. On CUDA the host-to-device copy
of the next batch runs on its own stream, under the forward of the current one.

Resume: scans are processed in chunks of ``chunk_size`` (rounded up to a multiple of the batch). Each
finished chunk is written atomically to ``EMB/chunks/chunk-NNNNN.npz`` with the fingerprint of the model
and settings that made it; a re-run reuses every chunk whose scans and fingerprint match, then assembles
``embeddings.npz`` + ``embeddings.json`` (:mod:`fmct.eval.embeddings`), ``errors.csv`` (scans skipped,
with the reason: unreadable, or features not finite) and ``config.yaml``.

Sharded (large stores): under ``torchrun`` (one node or several, ``EMB`` on storage every rank sees),
chunk k is embedded by rank ``k mod WORLD_SIZE`` on its own device; once every rank has written its
chunks, rank 0 reads them all and writes the single table, the same as one process writes (chunks and
batches are cut the same way whatever the number of ranks). Chunks finished by an earlier run, with any
number of ranks, are reused.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fmct import hub
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.config import save_config, to_dict
from fmct.data import StoreVolumes
from fmct.data.batches import read_hu_batches, to_device
from fmct.distributed import DistEnv, all_reduce_sum, close_distributed, init_distributed
from fmct.errors import ConfigError, InputError, UsageError
from fmct.eval import radiomics
from fmct.eval.embeddings import AUTO, write_embeddings
from fmct.fingerprint import weights_sha256
from fmct.log import progress_bar
from fmct.models import ViT3D
from fmct.models.encode import encode, feature_names
from fmct.models.windows import model_input
from fmct.paths import relative_to
from fmct.tables import rows_to_csv


@dataclass
class EmbedConfig:
    batch_size: int = 32
    workers: int = 4  # reader threads copying volumes out of the store
    chunk_size: int = 1024  # scans per resumable chunk file (rounded up to a multiple of batch_size)
    compile: bool = False  # torch.compile the forward pass (pays off on CUDA for large stores)
    # Written to the table's meta; the probe copies it into its predictions. Empty: pretrained, random-init
    # (--model scratch) or hu-histogram (--model hu-histogram).
    arm: str = ""
    model_name: str = ""  # empty: the (like) model folder's name (the run's name for RUN/backbone), or hu-histogram
    init_seed: int = 0  # seed of the random-init weights of --model scratch

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1 or self.workers < 1:
            raise ConfigError(
                f"batch_size ({self.batch_size}), chunk_size ({self.chunk_size}) and workers must be at least 1"
            )


@dataclass
class EmbedSummary:
    """What one ``embed_store`` call did. On rank 0 (or a single process): the whole table; on the other
    ranks of a sharded job: their own chunks (``n_embedded`` scans in them, ``n_chunks`` of them)."""

    out: Path
    n_embedded: int
    n_chunks: int
    n_chunks_reused: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1

    def describe(self) -> str:
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        line = (
            f"embed: {self.n_embedded} scans in {self.seconds:.1f} s{ranks} -> {self.out / 'embeddings.npz'}"
            f" ({self.n_chunks_reused} of {self.n_chunks} chunks reused)"
        )
        if self.skipped:
            line += f"\n  skipped {len(self.skipped)} scans, reasons in {self.out / 'errors.csv'}"
        return line


# --------------------------------------------------------------------------------------- encoders
HU_HISTOGRAM = "hu-histogram"  # --model hu-histogram: the radiomics floor


@dataclass
class Encoder:
    """What :func:`embed_store` runs on each batch and records about it.

    ``encode`` maps int16 HU volumes (B, 1, X, Y, Z) on the device to float features ``{name: (B, C)}``.
    ``fingerprint`` is what decides the features (a chunk made with another is recomputed); the table's
    meta holds it and ``meta``. ``name`` and ``arm`` are the table's defaults, ``default_feature`` the
    feature set the probe reads unless told otherwise (:mod:`fmct.eval.embeddings`), ``not_finite_reason``
    why a scan's features can be NaN (such a scan is skipped with it).
    """

    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    name: str
    arm: str
    fingerprint: dict
    meta: dict = field(default_factory=dict)
    default_feature: str = AUTO
    not_finite_reason: str = "the forward pass gave non-finite features"


def resolve_encoder(model: str, like: str | None, config: EmbedConfig, device: torch.device) -> Encoder:
    """The :class:`Encoder` of ``--model RUN|DIR|NAME|scratch|hu-histogram`` (``like``: the model whose
    architecture and windows ``scratch`` takes). Raises :class:`UsageError` for a bad combination and
    :class:`CheckpointError` for a bad model folder."""
    if model == HU_HISTOGRAM:
        if like is not None:
            raise UsageError(f"--like only applies to --model {hub.RANDOM_INIT}")
        fingerprint = {
            "features": HU_HISTOGRAM,
            "feature_columns": radiomics.FEATURE_COLUMNS,
            "head_hu": radiomics.HEAD_HU,
        }
        return Encoder(
            lambda hu: {radiomics.FEATURE_NAME: radiomics.first_order_features(hu)},
            HU_HISTOGRAM,
            "hu-histogram",
            fingerprint,
            default_feature=radiomics.FEATURE_NAME,
            not_finite_reason=radiomics.NOT_FINITE_REASON,
        )
    source = hub.resolve_model(model, like)
    backbone = source.build(device, config.init_seed)
    if source.is_random_init:
        return _backbone_encoder(
            backbone,
            source,
            "random-init",
            {"weights_sha256": weights_sha256(backbone)},
            {"model_path": "", "like": str(source.like_dir.resolve()), "init_seed": config.init_seed},
            config,
        )
    return _backbone_encoder(
        backbone,
        source,
        "pretrained",
        {"checkpoint_sha256": source.sha256},
        {"model_path": str(source.model_dir.resolve())},
        config,
    )


def _recorded_model(path: str, out: Path) -> str:
    """How the embeddings table names a model folder: a shipped model by its name, any other relative to
    ``out`` (:func:`fmct.paths.relative_to`), none as ""."""
    if not path:
        return ""
    if hub.is_shipped(path):
        return Path(path).name
    return relative_to(path, out)


def _backbone_encoder(
    model: ViT3D, source: hub.ModelSource, arm: str, weights: dict, meta: dict, config: EmbedConfig
) -> Encoder:
    """The encoder of a ViT: the whole volume resized and windowed, then its CLS, mean and max patch token
    and, with change heads, its change logit (:func:`encode`); ``weights`` identifies its weights."""
    forward_features = torch.compile(model.forward_features) if config.compile else model.forward_features
    windows = source.windows

    def features(hu: torch.Tensor) -> dict[str, torch.Tensor]:
        return encode(model, model_input(hu, model.config.img_size, windows), forward_features)

    device = next(model.parameters()).device
    # "features": chunks written before patch_max lack it, so they are not reused.
    fingerprint = {
        **weights,
        "windows_hu": [list(w) for w in windows],
        "input_size": list(model.config.img_size),
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "features": list(feature_names(model)),
    }
    return Encoder(features, source.name, arm, fingerprint, {**meta, "model_config": to_dict(model.config)})


# ----------------------------------------------------------------------------------------- chunks
CHUNK_KEYS = ("scan_id", "failed_scan_id", "failed_reason", "fingerprint")  # every other array is a feature


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


def _save_chunk(
    path: Path,
    scan_ids: list[str],
    features: dict[str, np.ndarray],
    failed: list[tuple[str, str]],
    fingerprint: str,
    not_finite_reason: str,
) -> dict[str, np.ndarray]:
    """Write a finished chunk; a scan with a non-finite feature value joins ``failed`` with ``not_finite_reason``."""
    finite = np.all([np.isfinite(values).all(axis=1) for values in features.values()], axis=0)
    failed = failed + [(s, not_finite_reason) for s, ok in zip(scan_ids, finite) if not ok]
    arrays = {
        "scan_id": np.asarray([s for s, ok in zip(scan_ids, finite) if ok], dtype=str).reshape(-1),
        **{name: values[finite].astype(np.float32) for name, values in features.items()},
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
    like: str | os.PathLike | None = None,
) -> EmbedSummary:
    """Embed every scan of the store at ``store_path`` into the embeddings folder ``out``; resumes from the
    finished chunks there. ``model_path``: a model folder or a pretraining run, ``scratch`` (a random-init
    backbone like the model at ``like``) or ``hu-histogram`` (see :func:`resolve_encoder`).

    Run by every process of a torchrun job (or alone): each rank embeds its share of the chunks and rank
    0 writes the table (see the module docstring). ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU. Raises :class:`fmct.errors.CheckpointError` for a bad model folder,
    :class:`fmct.errors.UsageError` for a bad model choice and :class:`fmct.errors.InputError` for a bad
    or empty store.
    """
    started = time.perf_counter()
    config = config or EmbedConfig()
    env = init_distributed(str(device) if device is not None else "auto")
    try:
        return _embed(model_path, store_path, Path(out), config, env, progress, like, started)
    finally:
        close_distributed()


def _embed(
    model_path: str | os.PathLike,
    store_path: str | os.PathLike,
    out: Path,
    config: EmbedConfig,
    env: DistEnv,
    progress: bool,
    like: str | os.PathLike | None,
    started: float,
) -> EmbedSummary:
    device = env.device
    encoder = resolve_encoder(str(model_path), None if like is None else str(like), config, device)
    volumes = StoreVolumes(store_path)
    fingerprint = json.dumps({**encoder.fingerprint, "store_shape": list(volumes.shape)}, sort_keys=True)

    chunk_scans = math.ceil(config.chunk_size / config.batch_size) * config.batch_size
    chunks = [range(start, min(start + chunk_scans, len(volumes))) for start in range(0, len(volumes), chunk_scans)]
    chunk_paths = [out / "chunks" / f"chunk-{k:05d}.npz" for k in range(len(chunks))]
    # Chunk k is rank (k mod world size)'s: a fixed share, so that no rank needs to know what the
    # others found finished.
    mine = [k for k in range(len(chunks)) if k % env.world_size == env.rank]
    finished = {}
    for k in mine:
        arrays = _load_chunk(chunk_paths[k], [volumes.scan_ids[i] for i in chunks[k]], fingerprint)
        if arrays is not None:
            finished[k] = arrays
    n_reused = len(finished)

    # Batches never straddle two chunks; plan[b] = (chunk of batch b, whether it closes the chunk).
    batches, plan = [], []
    for k in mine:
        if k in finished:
            continue
        starts = range(0, len(chunks[k]), config.batch_size)
        batches += [list(chunks[k][s : s + config.batch_size]) for s in starts]
        plan += [(k, s == starts[-1]) for s in starts]

    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    bar = progress_bar(
        total=sum(len(chunks[k]) for k in mine),
        initial=sum(len(chunks[k]) for k in finished),
        unit="scan",
        desc="embed" if env.world_size == 1 else f"embed (rank 0 of {env.world_size})",
        enabled=progress and env.is_main,
    )
    reader = read_hu_batches(volumes, batches, config.workers, pin_memory=device.type == "cuda")
    try:
        parts, ids, failed = {}, [], []
        for (k, closes_chunk), batch in zip(plan, reader):
            features = encoder.encode(to_device(batch.hu, device, copy_stream))
            keep = [row for row in range(len(batch.indices)) if row not in batch.failed]
            # Results stay on the device until the chunk closes: one synchronisation per chunk, not per batch.
            for name, values in features.items():
                parts.setdefault(name, []).append(values[keep] if batch.failed else values)
            ids += [volumes.scan_ids[batch.indices[row]] for row in keep]
            failed += [(volumes.scan_ids[batch.indices[row]], reason) for row, reason in batch.failed.items()]
            bar.update(len(batch.indices))
            if closes_chunk:
                chunk_features = {name: torch.cat(values).cpu().numpy() for name, values in parts.items()}
                finished[k] = _save_chunk(
                    chunk_paths[k], ids, chunk_features, failed, fingerprint, encoder.not_finite_reason
                )
                parts, ids, failed = {}, [], []
    finally:
        reader.close()
        bar.close()

    # A collective, so it also waits until every rank's chunks are on disk.
    n_reused_everywhere = int(all_reduce_sum(torch.tensor(n_reused, device=device)))
    if not env.is_main:
        n_mine = sum(len(finished[k]["scan_id"]) for k in mine)
        return EmbedSummary(
            out, n_mine, len(mine), n_reused, time.perf_counter() - started, rank=env.rank, world_size=env.world_size
        )
    for k in range(len(chunks)):
        if k not in finished:  # another rank's
            arrays = _load_chunk(chunk_paths[k], [volumes.scan_ids[i] for i in chunks[k]], fingerprint)
            if arrays is None:
                raise InputError(
                    f"{chunk_paths[k]}: missing or not of this run after rank {k % env.world_size} finished; "
                    f"is {out} on storage that every rank sees?"
                )
            finished[k] = arrays
    ordered = [finished[k] for k in range(len(chunks))]
    scan_ids = np.concatenate([arrays["scan_id"] for arrays in ordered])
    skipped = list(volumes.skipped) + [
        (s, r)
        for arrays in ordered
        for s, r in zip(arrays["failed_scan_id"].tolist(), arrays["failed_reason"].tolist())
    ]
    if len(scan_ids) == 0:
        raise InputError(f"{volumes.store.path}: no scan could be embedded (first reason: {skipped[0][1]})")
    meta = {
        "model": config.model_name or encoder.name,
        "arm": config.arm or encoder.arm,
        "default_feature": encoder.default_feature,
        **encoder.fingerprint,
        **encoder.meta,
        # Found again from the embeddings folder by the probe; no machine path in the table.
        **{key: _recorded_model(encoder.meta[key], out) for key in ("model_path", "like") if key in encoder.meta},
        "store": relative_to(volumes.store.path, out),
        "n_scans": int(len(scan_ids)),
        "n_skipped": len(skipped),
    }
    names = [name for name in ordered[0] if name not in CHUNK_KEYS]
    features = {name: np.concatenate([arrays[name] for arrays in ordered]) for name in names}
    write_embeddings(out, scan_ids, features, meta)
    atomic_write_text(
        out / "errors.csv", rows_to_csv([{"scan_id": s, "reason": r} for s, r in skipped], ["scan_id", "reason"])
    )
    save_config(config, out / "config.yaml")
    return EmbedSummary(
        out,
        len(scan_ids),
        len(chunks),
        n_reused_everywhere,
        time.perf_counter() - started,
        skipped,
        rank=env.rank,
        world_size=env.world_size,
    )
