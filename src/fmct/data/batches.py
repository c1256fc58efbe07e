"""Batches of whole int16 HU volumes of a store, read ahead by threads, and their copy to the device:
what embedding and fine-tuning feed their models (pretraining crops instead, through
:func:`fmct.data.make_loader`)."""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from fmct.data.dataset import StoreVolumes
from fmct.errors import ScanError


class HuBatch(NamedTuple):
    """``hu`` int16 (B, 1, X, Y, Z) on the host; ``indices`` its dataset indices; ``failed`` maps a row
    that could not be read to the reason (its values in ``hu`` are meaningless)."""

    hu: torch.Tensor
    indices: list[int]
    failed: dict[int, str]


def _read_into(volumes: StoreVolumes, index: int, out: np.ndarray) -> str | None:
    """Decode the volume of ``index`` into ``out``; the reason when it cannot be read, else None."""
    try:
        volumes.store.read(volumes.scan_ids[index], out=out)
    except ScanError as error:
        return str(error)
    return None


def read_hu_batches(
    volumes: StoreVolumes,
    batches: Iterable[Sequence[int]],
    workers: int = 4,
    pin_memory: bool = False,
    prefetch: int = 2,
) -> Iterator[HuBatch]:
    """The int16 HU volumes of each batch of dataset indices, read ``prefetch`` batches ahead.

    Threads, not worker processes: decoding (blosc2, numpy's copy) releases the GIL, and a thread
    writes straight into the batch's (pinned) buffer, where a worker process would add two copies of every volume (into
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
