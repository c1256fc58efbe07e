"""Reading the store for training: int16 volumes in, deterministic batches out.

The CPU only reads and decodes bytes here. Loader workers decode each canonical int16 HU volume from
its store file (:meth:`fmct.store.Store.read`); windows, crops and augmentation happen later on the
training device (:mod:`fmct.data.augment`).

Axis convention: a batch is an int16 tensor (B, 1, X, Y, Z) with X, Y, Z the store's RAS axes
(x towards the patient's right, y anterior, z superior). Models read it as (B, C, D, H, W) with
D = X, H = Y, W = Z, unchanged: no transpose anywhere.

Exact resume: :class:`StepBatchSampler` yields the batches of global step ``s`` as a pure function of
(seed, s, rank, world size), and :func:`batch_generator` gives the random generator that the step's
crops and masks are drawn from, so a run resumed at step k sees the same batches and crops as one
that never stopped. Rank r of W holds volumes ``r * B ..`` of the global batch of ``W * B``, and the
crops and masks are drawn for the global batch from a generator that is the same on every rank, so
the ranks together see what one process with the whole global batch sees: the same run on 1 or 64
processes (with the same global batch) takes the same steps.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fmct.errors import InputError
from fmct.store import Store


class StoreVolumes(Dataset):
    """The store's canonical volumes as a torch Dataset.

    ``dataset[i]`` is ``(hu, i)``: ``hu`` an int16 tensor (1, X, Y, Z) of HU values on the store's grid
    (RAS axes, ``store_spacing_mm`` isotropic, 128^3 at 1.5 mm by default), and ``i`` the index, which
    ``dataset.scan_ids[i]`` turns back into a scan id.

    All volumes of a batch must share one shape. Scans whose manifest ``store_shape`` differs from the
    most common one (a store extended with another canonical config) are left out and listed in
    ``skipped`` as ``(scan_id, reason)``. ``shape`` is the kept scans' grid (x, y, z) in voxels,
    ``spacing_mm`` their isotropic voxel size (None where the manifest does not record it).
    """

    def __init__(self, store: Store | str | os.PathLike, scan_ids: Sequence[str] | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        if scan_ids is None:
            scan_ids = self.store.scan_ids
        unknown = [s for s in scan_ids if s not in self.store]
        if unknown:
            raise InputError(f"{self.store.path}: {len(unknown)} scan ids not in the store, e.g. {unknown[0]!r}")
        rows = {row["scan_id"]: row for row in self.store.rows}
        shapes = {s: tuple(rows[s]["store_shape"]) for s in scan_ids}
        if not shapes:
            raise InputError(f"{self.store.path}: no scans to read")
        values = list(shapes.values())
        self.shape: tuple[int, int, int] = max(set(values), key=values.count)
        self.scan_ids: list[str] = [s for s in scan_ids if shapes[s] == self.shape]
        self.skipped: list[tuple[str, str]] = [
            (s, f"store_shape {list(shapes[s])} differs from the dataset's {list(self.shape)}")
            for s in scan_ids
            if shapes[s] != self.shape
        ]
        # The canonical grid is isotropic: one spacing in mm for every axis (None: not recorded).
        spacing = rows[self.scan_ids[0]].get("store_spacing_mm") if self.scan_ids else None
        self.spacing_mm: float | None = float(spacing[0]) if spacing else None

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Raises :class:`~fmct.io.volume.ScanError` naming the file of a scan that cannot be read."""
        return torch.from_numpy(self.store.read(self.scan_ids[index])[None]), index


class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices addressed by global step, sharded across ranks.

    Epoch ``e`` is a permutation of the dataset drawn from ``(seed, e)``. Global step ``s`` takes the
    ``s``-th slice of ``batch_size * world_size`` indices of its epoch, and rank ``r`` takes the
    ``r``-th ``batch_size`` of that slice; the last incomplete slice of an epoch is dropped so every
    rank runs the same number of steps. Iteration starts at ``start_step`` and runs to ``total_steps``
    (forever when None), crossing epochs.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        total_steps: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.steps_per_epoch = n_items // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_items} scans do not fill one global batch of {batch_size} x {world_size} ranks")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.total_steps = total_steps
        self._cached_epoch, self._cached_permutation = -1, np.arange(0)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The order of dataset indices in ``epoch`` (the same on every rank)."""
        if epoch != self._cached_epoch:
            self._cached_permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
            self._cached_epoch = epoch
        return self._cached_permutation

    def batch_at(self, step: int) -> list[int]:
        """This rank's dataset indices at global step ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = (step_in_epoch * self.world_size + self.rank) * self.batch_size
        return self.epoch_permutation(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless StepBatchSampler has no length (set total_steps)")
        return max(self.total_steps - self.start_step, 0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    total_steps: int | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` yielding ``(hu, indices)`` per global step from ``start_step`` on.

    ``hu`` is int16 (batch_size, 1, X, Y, Z) (see the module's axis convention), ``indices`` int64
    (batch_size,). ``batch_size`` is per rank. Batches follow :class:`StepBatchSampler`, so resuming at
    ``start_step = k`` yields exactly the batches an uninterrupted run sees from step k. Memory is
    pinned when CUDA is available (for ``.to(device, non_blocking=True)``); workers > 0 run as
    persistent processes that only read bytes.
    """
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_step, total_steps)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the random draws made for the whole global batch of one step.

    Seeded from (seed, step) only, the same on every rank (and on resume). Pass it to
    :class:`~fmct.data.augment.MultiCropAugment` and :func:`~fmct.data.masking.sample_ibot_masks` in
    that order, with the rank's place in the global batch. A stream of its own: never equal to
    :func:`step_generator`'s for any rank.
    """
    state = np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` for the random draws of one training step on one rank.

    Seeded from (seed, step, rank) only, so the draws of step k are the same whether or not the run
    was interrupted before it: the draws that are this rank's own (pretraining's stochastic depth,
    fine-tuning's crops); those made for the global batch come from :func:`batch_generator`.
    """
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
