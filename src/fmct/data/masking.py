"""3D block masking of patch tokens for iBOT (masked image modeling on the global crops).

A mask is a bool array over the patch grid (D, H, W) of one crop, flattened row-major into N = D*H*W
tokens: token ``d*H*W + h*W + w``, the order of a Conv3d patch embedding's ``flatten(2)``. True means
"masked": the student sees the mask token there and the teacher's prediction is the target.

Masks are drawn on the CPU from an explicit ``torch.Generator`` (so a resumed run draws the same masks)
and moved to the training device once per batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Blocks tried per placement round before the remainder is filled with single tokens.
_BLOCK_ATTEMPTS = 10


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    # The block placement loop draws many scalars; numpy's generator does that far faster than torch,
    # and seeding it from the torch generator keeps one seed in charge of everything (None: torch's
    # global generator, as in torch's own random functions).
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


def _block_mask(
    grid: tuple[int, int, int],
    n_masked: int,
    rng: np.random.Generator,
    min_block: int,
    aspect_range: tuple[float, float],
) -> np.ndarray:
    mask = np.zeros(grid, dtype=bool)
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    count = 0
    while count < n_masked:
        remaining = n_masked - count
        placed = False
        for _ in range(_BLOCK_ATTEMPTS):
            if remaining < min_block:
                break
            volume = rng.uniform(min_block, remaining)
            # One log-uniform factor per axis, centred so the three factors multiply to 1: the block
            # keeps the drawn volume and only its shape varies.
            factors = rng.uniform(*log_aspect, size=3)
            factors = np.exp(factors - factors.mean())
            sides = [min(max(int(round(volume ** (1 / 3) * f)), 1), g) for f, g in zip(factors, grid)]
            corner = [rng.integers(0, g - s + 1) for s, g in zip(sides, grid)]
            block = tuple(slice(c, c + s) for c, s in zip(corner, sides))
            new = int(np.count_nonzero(~mask[block]))
            # A block that would overshoot the target is rejected, so the count never exceeds it.
            if 0 < new <= remaining:
                mask[block] = True
                count += new
                placed = True
                break
        if not placed:
            break
    if count < n_masked:
        # Blocks no longer fit the remainder (few tokens left, or a crowded grid): finish with random
        # single tokens so the count is exact.
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask


def block_mask_3d(
    grid: tuple[int, int, int] = (8, 8, 8),
    ratio: float = 0.3,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A bool mask (D, H, W) over a patch grid with exactly ``floor(ratio * D*H*W)`` tokens True
    (DINOv2 floors its counts).

    Masked tokens come in cuboid blocks: each block has a volume drawn uniformly between ``min_block``
    tokens and the number still to mask, and per-axis side factors drawn log-uniformly in
    ``aspect_range`` and normalised to multiply to 1 (so a factor range of (0.3, 3.3) gives boxes from
    cubes to flat slabs). A block that would mask more tokens than remain is rejected; when ten blocks
    in a row are rejected, or fewer than ``min_block`` tokens remain, the rest are masked as random
    single tokens. The count is therefore exact, and mostly made of blocks for ratios up to about 0.5.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    if min_block < 1:
        raise ValueError(f"min_block must be at least 1 token, got {min_block}")
    if not 0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"aspect_range must be (low, high) with 0 < low <= high, got {aspect_range}")
    grid = tuple(int(g) for g in grid)
    n_masked = int(ratio * math.prod(grid))
    mask = _block_mask(grid, n_masked, _numpy_rng(generator), min_block, aspect_range)
    return torch.from_numpy(mask)


def sample_ibot_masks(
    batch: int,
    grid: tuple[int, int, int] = (8, 8, 8),
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    min_block: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """iBOT masks for a batch of crops: (batch, N) bool on ``device``, N = D*H*W tokens, row-major.

    ``int(batch * mask_probability)`` crops are masked (as DINOv2 does; the others are all False). Their
    ratios are spread over ``ratio_range``: the range is cut into as many equal bins as masked crops
    and crop i draws its ratio uniformly in bin i, so a batch always spans the whole range. Then the
    batch order is shuffled, so which crops are masked is random. Each mask is a
    :func:`block_mask_3d` with exactly ``floor(ratio * N)`` tokens, placed by a generator of its own
    crop (seeded from ``generator``). For multi-crop batches in crop-major order (crop 0 of every
    image, then crop 1, ...), pass ``batch = n_global * images``.

    ``rows`` (int64 indices into the batch): build only these crops' masks, (len(rows), N), in that
    order. A rank of a data-parallel job passes the global batch as ``batch``, a generator that is the
    same on every rank and its own crops' rows (:func:`fmct.data.augment.crop_major_rows`): the ranks'
    masks together are then those of one process holding the global batch, and each rank only places
    the blocks of its own crops.
    """
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, got {ratio_range}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must lie in [0, 1], got {mask_probability}")
    grid = tuple(int(g) for g in grid)
    rng = _numpy_rng(generator)
    n_tokens = math.prod(grid)
    n_masked_crops = int(batch * mask_probability)
    bin_edges = np.linspace(low, high, n_masked_crops + 1)
    ratios = np.zeros(batch)
    ratios[:n_masked_crops] = rng.uniform(bin_edges[:-1], bin_edges[1:])
    ratios = ratios[rng.permutation(batch)]
    crop_seeds = rng.integers(0, 2**63, size=batch)
    rows = np.arange(batch) if rows is None else np.asarray(rows, dtype=np.int64)
    masks = np.zeros((len(rows), n_tokens), dtype=bool)
    for i, row in enumerate(rows):
        if ratios[row] > 0:
            crop_rng = np.random.default_rng(crop_seeds[row])
            masks[i] = _block_mask(grid, int(ratios[row] * n_tokens), crop_rng, min_block, aspect_range).ravel()
    return torch.from_numpy(masks).to(device)
