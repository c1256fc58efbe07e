"""KoLeo regulariser: spreads features uniformly on the sphere (Sablayrolles et al. 2019; DINOv2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimate, negated: ``-mean_i log d_i``.

    The rows of the (B, C) features are L2-normalised and d_i is the Euclidean distance from row i to
    its nearest other row, taken as ``sqrt(|x_i - x_nn|^2 + eps^2)``. The eps inside the square root
    keeps both the value and the gradient finite when two rows coincide (identical scans or a
    collapsing model): the value is then ``-log eps`` and that pair's gradient is 0, where
    ``log |x_i - x_j|`` would be -inf and its gradient NaN. Computed in fp32 whatever the autocast
    dtype: in half precision a small distance rounds to 0.

    Hand check: 4 rows at the corners of a square on a great circle, (1,0), (0,1), (-1,0), (0,-1):
    every nearest-neighbour distance is sqrt(2), so the loss is -log sqrt(2) = -0.3466.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``features`` (B, C), B >= 2 (e.g. the student CLS tokens of one global crop)."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs features (B >= 2, C), got shape {tuple(features.shape)}")
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=1e-8)
            with torch.no_grad():
                # The nearest neighbour on the sphere has the largest dot product; exclude each row itself.
                nearest = (x @ x.T).fill_diagonal_(-2.0).argmax(dim=1)
            squared_distance = (x - x[nearest]).pow(2).sum(dim=-1)
            return -0.5 * torch.log(squared_distance + self.eps**2).mean()
