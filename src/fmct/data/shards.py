"""Streaming shards: a store packed into WebDataset tar files, read back in an order that is a pure
function of (seed, epoch, rank, world size), for pretraining on stores larger than a disk.

Layout of a shard folder (``fmct store pack STORE --out SHARDS``)::

    shards.json        the index: format, grid (store_shape, store_spacing_mm), codec, and per shard its
                       file name and scan ids in order; written last, so it marks the pack complete
    shard-000000.tar   a WebDataset shard: per scan ``<scan_id>.b2nd`` (the volume file of the store,
                       :mod:`fmct.codec`) and ``<scan_id>.json`` ({"scan_id", "store_shape", "store_spacing_mm"})

The index stays on local disk (a few kB per thousand scans); the shards may live elsewhere: ``url``
(``data.shards_url`` of pretraining) is a template with ``{shard}``, opened with WebDataset's
``gopen``, e.g. ``pipe:aws s3 cp s3://bucket/shards/{shard} -`` or ``https://host/shards/{shard}``.
Shards are streamed, never stored locally: at most two groups of ``shuffle_shards`` shards (the one
being read and the next, fetched ahead) are held in memory, as compressed bytes.

The order of epoch ``e`` (one pass over every scan) on rank ``r`` of ``W``: the shards are permuted by
a generator seeded with ``(seed, e)``; rank ``r`` takes every ``W``-th shard of that order, from the
``r``-th on; it reads them in groups of ``shuffle_shards`` consecutive shards, and the scans of group
``g`` are permuted by a generator seeded with ``(seed, e, r, g)``. Every rank runs the same number of
steps per epoch (:meth:`ShardVolumes.steps_per_epoch`, what the rank with the fewest and smallest
shards can fill); a rank's scans past that are left for the epoch. Global step ``s`` is batch
``s mod steps_per_epoch`` of epoch ``s div steps_per_epoch``, so a run resumed at step ``k`` skips the
groups before its position unread and yields exactly the batches an uninterrupted run yields from
step ``k`` on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from fmct.atomic import atomic_write_stream, atomic_write_text
from fmct.codec import BLOSC2_CODECS, DEFAULT_CODEC, check_codec, codec_of, decode, encode
from fmct.data.dataset import StoreVolumes
from fmct.errors import ConfigError, InputError, ScanError
from fmct.log import progress_bar
from fmct.store import Store

INDEX_FILE = "shards.json"
FORMAT = "fmct-shards/1"
_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")


def is_shard_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a shard index (written by :func:`pack_store`)."""
    return (Path(path) / INDEX_FILE).is_file()


# ------------------------------------------------------------------------------------------- packing
@dataclass
class PackSummary:
    """What a pack run did."""

    out: Path
    codec: str
    shards: int = 0
    written: int = 0  # shards written in this run
    reused: int = 0  # shards already complete from an earlier run
    scans: int = 0
    bytes: int = 0  # all shards
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (scan_id, reason), not packed

    def describe(self) -> str:
        lines = [
            f"pack: {self.scans} scans in {self.shards} shards ({self.written} written, {self.reused} reused), "
            f"{self.bytes / 2**20:.1f} MiB in {self.codec} -> {self.out / INDEX_FILE}"
        ]
        lines += [f"pack: {scan_id} not packed: {reason}" for scan_id, reason in self.skipped]
        return "\n".join(lines)


def pack_store(
    store: str | os.PathLike,
    out: str | os.PathLike,
    scans_per_shard: int = 64,
    codec: str = DEFAULT_CODEC,
    progress: bool = True,
) -> PackSummary:
    """Pack the scans of ``store`` (those of its most common grid) into WebDataset shards in ``out``.

    Scans go in the store's order (sorted pseudonymous ids: no site or patient order), ``scans_per_shard``
    per shard, each as its volume file in ``codec`` (a blosc2 codec of :mod:`fmct.codec`; a store file
    already in it is copied byte for byte after it decodes). Resumable: each shard is written atomically
    and a shard already holding its planned scans in ``codec`` is kept; the index is written last. A
    scan that cannot be read is left out and reported. Raises ConfigError or InputError for bad arguments.
    """
    if check_codec(codec) not in BLOSC2_CODECS:
        raise ConfigError(f"shards hold compressed volumes: codec {codec!r} is not one of {', '.join(BLOSC2_CODECS)}")
    if scans_per_shard < 1:
        raise ConfigError(f"scans_per_shard must be at least 1, got {scans_per_shard}")
    volumes = StoreVolumes(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = PackSummary(out=out, codec=codec, skipped=list(volumes.skipped))
    bad = [s for s in volumes.scan_ids if not re.fullmatch(r"[\w-]+", s)]
    if bad:
        raise InputError(
            f"{volumes.store.path}: scan id {bad[0]!r} cannot name a shard member (letters, digits, _ and - only)"
        )

    readable, index_shards = [], []
    planned = [volumes.scan_ids[i : i + scans_per_shard] for i in range(0, len(volumes.scan_ids), scans_per_shard)]
    bar = progress_bar(total=len(volumes.scan_ids), unit="scan", desc="pack", enabled=progress)
    for scan_ids in planned:
        name = f"shard-{len(index_shards):06d}.tar"
        if _shard_holds(out / name, scan_ids, codec):
            summary.reused += 1
            kept = scan_ids
        else:
            frames = {}
            for scan_id in scan_ids:
                try:
                    frames[scan_id] = _frame(volumes.store, scan_id, codec)
                except ScanError as error:
                    summary.skipped.append((scan_id, str(error)))
            kept = list(frames)
            if not kept:
                bar.update(len(scan_ids))
                continue
            atomic_write_stream(out / name, lambda handle: _write_tar(handle, volumes.store, frames))
            summary.written += 1
        readable += kept
        index_shards.append({"name": name, "scan_ids": kept})
        summary.bytes += (out / name).stat().st_size
        bar.update(len(scan_ids))
    bar.close()
    for stale in sorted(out.glob("shard-*.tar")):  # shards of an earlier pack of a larger store
        if _SHARD_NAME.match(stale.name) and stale.name not in {s["name"] for s in index_shards}:
            stale.unlink()
    if not index_shards:
        raise InputError(f"{volumes.store.path}: no scan could be read, nothing packed")
    spacing = volumes.store.row(readable[0]).get("store_spacing_mm")
    index = {
        "format": FORMAT,
        "store_shape": list(volumes.shape),
        "store_spacing_mm": spacing,
        "codec": codec,
        "scans": len(readable),
        "shards": index_shards,
    }
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    summary.shards, summary.scans = len(index_shards), len(readable)
    return summary


def _frame(store: Store, scan_id: str, codec: str) -> bytes:
    """The scan's volume file in ``codec``: the store's own file when it already is (checked to decode)."""
    hu = store.read(scan_id)  # raises ScanError for a file that cannot be read
    data = store.scan_file(scan_id).read_bytes()
    return data if codec_of(data) == codec else encode(hu, codec)


def _write_tar(handle, store: Store, frames: dict[str, bytes]) -> None:
    """One shard: per scan its volume file and the grid part of its manifest row (no source path)."""
    import webdataset

    # mtime 0: packing the same scans again gives the same bytes.
    with webdataset.TarWriter(handle, encoder=False, mtime=0) as sink:
        for scan_id, frame in frames.items():
            row = store.row(scan_id)
            meta = {
                "scan_id": scan_id,
                "store_shape": row.get("store_shape"),
                "store_spacing_mm": row.get("store_spacing_mm"),
            }
            sink.write({"__key__": scan_id, "b2nd": frame, "json": json.dumps(meta).encode()})


def _shard_holds(path: Path, scan_ids: list[str], codec: str) -> bool:
    """True when the shard at ``path`` is a whole shard of exactly ``scan_ids`` in ``codec``."""
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            first = tar.extractfile(f"{scan_ids[0]}.b2nd").read() if names else b""
        return names == [f"{s}.{ext}" for s in scan_ids for ext in ("b2nd", "json")] and codec_of(first) == codec
    except (OSError, tarfile.TarError, KeyError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- reading
class Group(NamedTuple):
    """Shards read together, and the dataset indices of their scans in the order they are yielded."""

    shards: list[str]
    order: list[int]


class ShardVolumes:
    """The scans of a shard folder (:func:`pack_store`), streamed as int16 batches.

    ``scan_ids`` lists every packed scan (dataset index ``i`` is ``scan_ids[i]``), ``shape`` the grid
    (x, y, z) in voxels, ``spacing_mm`` its isotropic voxel size (None where the index has none),
    ``len()`` the number of scans. ``url`` is where the shards are read from: a template with
    ``{shard}`` (see the module), empty for the index's own folder. Raises InputError for a folder
    without an index or an index fmct cannot read.
    """

    def __init__(self, path: str | os.PathLike, url: str = "", shuffle_shards: int = 4):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise InputError(f"{self.path}: not a shard folder (no {INDEX_FILE}; fmct store pack writes one)")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT:
                raise InputError(
                    f"{index_path}: not a shard index fmct can read: format {index.get('format')!r}, "
                    f"expected {FORMAT!r}"
                )
            self.shape: tuple[int, int, int] = tuple(index["store_shape"])
            spacing = index.get("store_spacing_mm")
            self.spacing_mm: float | None = float(spacing[0]) if spacing else None
            self.shards: list[tuple[str, list[str]]] = [(s["name"], list(s["scan_ids"])) for s in index["shards"]]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{index_path}: not a shard index fmct can read: {error}") from None
        if shuffle_shards < 1:
            raise ConfigError(f"shuffle_shards must be at least 1, got {shuffle_shards}")
        if url and "{shard}" not in url:
            raise ConfigError(f"shards url {url!r} has no {{shard}} to put each shard's file name in")
        self.url = url
        self.shuffle_shards = shuffle_shards
        self.scan_ids: list[str] = [scan_id for _, scan_ids in self.shards for scan_id in scan_ids]
        self.skipped: list[tuple[str, str]] = []  # as StoreVolumes: every packed scan has the index's grid
        self._first_index = list(itertools.accumulate([0] + [len(ids) for _, ids in self.shards]))
        self._shard_number = {name: k for k, (name, _) in enumerate(self.shards)}

    def __len__(self) -> int:
        return len(self.scan_ids)

    def shard_url(self, name: str) -> str:
        """Where shard ``name`` is read from: ``url`` filled in, else the file beside the index."""
        return self.url.format(shard=name) if self.url else str(self.path / name)

    # ------------------------------------------------------------------------------------- the order
    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Steps in every epoch: the batches the rank with the fewest and smallest shards can fill."""
        if len(self.shards) < world_size:
            raise InputError(
                f"{self.path}: {len(self.shards)} shards cannot feed {world_size} ranks; "
                f"pack with fewer scans per shard"
            )
        smallest = sorted(len(ids) for _, ids in self.shards)[: len(self.shards) // world_size]
        steps = sum(smallest) // batch_size
        if steps == 0:
            raise InputError(
                f"{self.path}: {len(self)} scans in {len(self.shards)} shards do not fill one batch of "
                f"{batch_size} on each of {world_size} ranks"
            )
        return steps

    def epoch_groups(self, epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> list[Group]:
        """The groups rank ``rank`` reads in ``epoch``, in order, with the order of their scans."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))[rank::world_size]
        groups = []
        for g, start in enumerate(range(0, len(shard_order), self.shuffle_shards)):
            members = shard_order[start : start + self.shuffle_shards].tolist()
            indices = [i for k in members for i in range(self._first_index[k], self._first_index[k + 1])]
            permutation = np.random.default_rng([seed, epoch, rank, g]).permutation(len(indices))
            groups.append(Group([self.shards[k][0] for k in members], [indices[p] for p in permutation]))
        return groups

    def epoch_order(self, epoch: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> list[int]:
        """The dataset indices rank ``rank`` yields in ``epoch``, in order (steps_per_epoch x batch_size)."""
        order = [i for group in self.epoch_groups(epoch, seed, rank, world_size) for i in group.order]
        return order[: self.steps_per_epoch(batch_size, world_size) * batch_size]

    # --------------------------------------------------------------------------------------- batches
    def batches(
        self,
        batch_size: int,
        workers: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        total_steps: int | None = None,
        pin_memory: bool | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(hu, indices)`` of this rank per global step from ``start_step`` to ``total_steps`` (forever when None).

        ``hu`` is int16 (batch_size, 1, X, Y, Z), ``indices`` int64 (batch_size,): as
        :func:`fmct.data.make_loader` yields from a store, in the order of the module docstring.
        ``workers`` threads decode the volumes of the coming batches (blosc2 releases the GIL); one
        more fetches the next group of shards while the current one is used. Memory is pinned when
        ``pin_memory`` (default: when CUDA is available). Raises :class:`~fmct.io.volume.ScanError` for
        a shard that cannot be read or does not hold the scans its index lists.
        """
        steps_per_epoch = self.steps_per_epoch(batch_size, world_size)  # raises now, not at the first batch
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return self._batches(
            batch_size, steps_per_epoch, workers, seed, rank, world_size, start_step, total_steps, pin_memory
        )

    def _batches(
        self,
        batch_size: int,
        steps_per_epoch: int,
        workers: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        total_steps: int | None,
        pin_memory: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fetcher = ThreadPoolExecutor(1, thread_name_prefix="fmct-shards")
        decoder = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fmct-decode")
        samples = self._samples(seed, rank, world_size, batch_size * steps_per_epoch, batch_size * start_step, fetcher)

        def submit(batch: list[tuple[int, bytes, str]]):
            hu = torch.empty((batch_size, 1, *self.shape), dtype=torch.int16, pin_memory=pin_memory)
            rows = hu.numpy()
            futures = [
                decoder.submit(_decode_into, frame, rows[row, 0], where) for row, (_, frame, where) in enumerate(batch)
            ]
            return hu, torch.tensor([i for i, _, _ in batch], dtype=torch.int64), futures

        steps = itertools.count(start_step) if total_steps is None else range(start_step, total_steps)
        batches = (list(itertools.islice(samples, batch_size)) for _ in steps)
        pending = deque(submit(batch) for batch in itertools.islice(batches, 2))  # decoded two batches ahead
        try:
            while pending:
                hu, indices, futures = pending.popleft()
                for future in futures:
                    future.result()
                following = next(batches, None)
                if following is not None:
                    pending.append(submit(following))
                yield hu, indices
        finally:
            samples.close()
            decoder.shutdown(wait=True, cancel_futures=True)
            fetcher.shutdown(wait=True, cancel_futures=True)

    def _samples(
        self, seed: int, rank: int, world_size: int, per_epoch: int, skip: int, fetcher: ThreadPoolExecutor
    ) -> Iterator[tuple[int, bytes, str]]:
        """``(index, volume file bytes, where)`` of this rank's scans, endlessly over epochs, from position
        ``skip`` of the first epoch on; the group after the current one is fetched ahead."""
        epoch, skip = divmod(skip, per_epoch)
        wanted = self._wanted_groups(seed, rank, world_size, per_epoch, epoch, skip)
        following = fetcher.submit(self._read_group, next(wanted))
        while True:
            frames, (group, first, stop) = following.result()
            following = fetcher.submit(self._read_group, next(wanted))
            for index in group.order[first:stop]:
                yield index, frames[self.scan_ids[index]], self._where(index)

    def _wanted_groups(self, seed: int, rank: int, world_size: int, per_epoch: int, epoch: int, skip: int):
        """``(group, first, stop)``: the part ``order[first:stop]`` of each group to yield, endlessly."""
        while True:
            start = 0  # position of the group's first scan in the epoch's order
            for group in self.epoch_groups(epoch, seed, rank, world_size):
                first, stop = max(skip - start, 0), min(len(group.order), per_epoch - start)
                if first < stop:
                    yield group, first, stop
                start += len(group.order)
            epoch, skip = epoch + 1, 0

    def _read_group(self, wanted: tuple[Group, int, int]) -> tuple[dict[str, bytes], tuple[Group, int, int]]:
        """The volume file bytes of every scan of the group's shards, streamed from their URLs."""
        frames = {}
        for name in wanted[0].shards:
            url = self.shard_url(name)
            expected = self.shards[self._shard_number[name]][1]
            found = _read_shard(url)
            if [key for key, _ in found] != expected or any(frame is None for _, frame in found):
                raise ScanError(
                    f"{url}: does not hold the {len(expected)} scans {self.path / INDEX_FILE} lists for it "
                    f"(found {len(found)}); pack the store again"
                )
            frames.update(found)
        return frames, wanted

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._first_index, index, side="right")) - 1
        return f"{self.shard_url(self.shards[shard][0])}/{self.scan_ids[index]}.b2nd"


def _read_shard(url: str) -> list[tuple[str, bytes | None]]:
    """``(scan_id, volume file bytes)`` of each sample of the shard at ``url``, in order (WebDataset's reader)."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = None
    try:
        stream = gopen(url)
        return [
            (s["__key__"], s.get("b2nd")) for s in group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        ]
    except Exception as error:  # gopen, a pipe's command or tar: the one-line reason, whatever failed
        raise ScanError(f"{url}: cannot read the shard: {_reason(error, stream)}") from None
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):  # the reason, if any, is already in hand
                stream.close()


def _reason(error: Exception, stream) -> str:
    """One line for why a shard could not be read: a pipe's failed command first (its output then looks
    like an empty or cut tar file), else the error's own first line (WebDataset appends the stream and
    URL to its args)."""
    command = getattr(stream, "proc", None)  # gopen's Pipe, for pipe:, http(s): (curl) and gs: (gsutil)
    if command is not None and command.wait() != 0:
        return f"its command exited with status {command.returncode}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = str(error.args[0]) if error.args else type(error).__name__
    return first.splitlines()[0].split(" @ <")[0]  # tar's reason, without the stream WebDataset appends


def _decode_into(frame: bytes, out: np.ndarray, where: str) -> None:
    try:
        decode(frame, out)
    except ValueError as error:
        raise ScanError(f"{where}: cannot read: {error}") from None
