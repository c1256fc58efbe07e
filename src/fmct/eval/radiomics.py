"""First-order HU features of a scan: the radiomics floor that every pretrained model must beat.

Computed from the store's canonical int16 HU volume as it is (no resizing, no windows), one vector of
``FEATURE_COLUMNS`` per scan:

- ``hist_<c>`` for c = -50, -45, ..., 150 HU (41 bins of 5 HU): the share of the head's voxels whose HU
  lies in c-2 .. c+2 (integers, both ends included; so the bins cover -52 .. 152 HU without overlap).
  The head is every voxel above ``HEAD_HU`` (-300 HU, ingest's threshold of body tissue), skull included,
  so the 41 shares add up to the share of the head within -52 .. 152 HU.
- ``mean``, ``std`` (population), ``p10``, ``p25``, ``p50``, ``p75``, ``p90``, all in HU, of the voxels
  within 0 .. 100 HU (CSF, brain and blood): percentile p is the smallest HU value with at least p % of
  those voxels at or below it (numpy's ``inverted_cdf``), exact because HU are integers.

A share is NaN when the volume has no head voxel, a statistic when it has no voxel within 0 .. 100 HU;
``fmct embed --model hu-histogram`` skips such a scan with that reason.
"""

from __future__ import annotations

import torch

from fmct.config import CanonicalConfig

HEAD_HU = CanonicalConfig.head_threshold_hu  # HU; above it a voxel is head (ingest's default)
BIN_WIDTH_HU = 5
BIN_CENTRES_HU = tuple(range(-50, 151, BIN_WIDTH_HU))  # 41 bins
STATS_RANGE_HU = (0, 100)  # both ends included
PERCENTILES = (10, 25, 50, 75, 90)
FEATURE_COLUMNS = [f"hist_{c}" for c in BIN_CENTRES_HU] + ["mean", "std"] + [f"p{p}" for p in PERCENTILES]
FEATURE_NAME = "first_order"  # the feature's name in the embeddings table
NOT_FINITE_REASON = (
    f"no voxel above {HEAD_HU:g} HU (no head) or none within {STATS_RANGE_HU[0]}..{STATS_RANGE_HU[1]} HU"
)


def first_order_features(hu: torch.Tensor) -> torch.Tensor:
    """float32 (B, len(FEATURE_COLUMNS)) features of integer HU volumes (B, 1, X, Y, Z) on any device
    (see the module docstring for each column)."""
    low = BIN_CENTRES_HU[0] - BIN_WIDTH_HU // 2  # -52 HU
    n_values = len(BIN_CENTRES_HU) * BIN_WIDTH_HU  # 205 integer HU values, low .. low + 204
    range_hu = torch.arange(STATS_RANGE_HU[0], STATS_RANGE_HU[1] + 1, device=hu.device, dtype=torch.float64)
    in_range = slice(STATS_RANGE_HU[0] - low, STATS_RANGE_HU[1] - low + 1)
    rows = []
    for volume in hu.flatten(1):  # one volume at a time: one int64 copy of it, not of the batch
        # Values below (above) the histogram's range land in the first (last) count, which is dropped.
        index = volume.clamp(low - 1, low + n_values).long() - (low - 1)
        counts = torch.bincount(index, minlength=n_values + 2)[1:-1].double()  # counts[k]: voxels at low + k HU
        n_head = (volume > HEAD_HU).sum().double()
        histogram = counts.view(len(BIN_CENTRES_HU), BIN_WIDTH_HU).sum(dim=1) / n_head

        brain = counts[in_range]  # voxels at each HU of STATS_RANGE_HU
        n_brain = brain.sum()
        mean = (brain * range_hu).sum() / n_brain
        std = ((brain * (range_hu - mean) ** 2).sum() / n_brain).sqrt()
        # Percentile p: the first HU value whose cumulative count reaches p % of n_brain (integers, exact).
        cumulative = brain.cumsum(dim=0)
        percentiles = [range_hu[(cumulative * 100 < p * n_brain).sum()] for p in PERCENTILES]
        stats = torch.stack([mean, std, *percentiles])
        rows.append(torch.cat([histogram, torch.where(n_brain > 0, stats, torch.nan)]))
    return torch.stack(rows).float()
