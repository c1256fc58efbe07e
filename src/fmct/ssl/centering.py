"""Teacher targets: EMA centering + sharpening (DINO) or Sinkhorn-Knopp balancing (SwAV, DINOv2).

Both turn teacher logits (..., K) into probabilities over the K prototypes and prevent collapse onto a
single prototype. Sums over the batch are all-reduced when ``torch.distributed`` is initialised, so every
rank computes the same centre and the same balancing over the global batch, even when ranks hold
different numbers of rows (masked patch tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fmct.distributed import all_reduce_


class EMACenter(nn.Module):
    """DINO's centering: ``softmax((logits - center) / teacher_temp)``, the centre an EMA of batch means.

    ``center <- momentum * center + (1 - momentum) * mean over the global batch of the logits``.
    Subtracting the centre keeps one prototype from winning for every input; a low temperature keeps
    the output from becoming uniform. The centre is a buffer, saved in ``state_dict()``.

    Hand check (K = 2, momentum 0.9, centre 0): logits [[1, 0], [3, 0]] have batch mean [2, 0] and the
    centre becomes [0.2, 0]. With teacher_temp 1, ``softmax_centered([[1, 0]])`` then gives
    softmax([0.8, 0]) = [0.690, 0.310].
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def softmax_centered(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities (..., K) from logits (..., K) with the current centre (fp32, no gradient)."""
        with torch.no_grad():
            return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the mean of ``teacher_logits`` (..., K) over all rows of all ranks."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[1])
        totals = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        all_reduce_(totals)
        if totals[-1] == 0:
            return
        batch_mean = totals[:-1] / totals[-1]
        self.center.mul_(self.momentum).add_(batch_mean.unsqueeze(0), alpha=1.0 - self.momentum)

    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Probabilities with the current centre, then the centre update: the order DINO uses."""
        probs = self.softmax_centered(teacher_logits, teacher_temp)
        self.update(teacher_logits)
        return probs


def _global_logsumexp(log_values: torch.Tensor, dim: int | None) -> torch.Tensor:
    """log of the sum of exp(log_values) over ``dim`` (None: all entries) and over all ranks."""
    local = torch.logsumexp(log_values.reshape(-1) if dim is None else log_values, dim=dim or 0, keepdim=True)
    # Combine the ranks' partial results as max + log sum exp(partial - max); an empty rank gives -inf.
    peak = all_reduce_(local.clone(), op="max")
    return peak + torch.log(all_reduce_(torch.exp(local - peak)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced teacher probabilities (M, K) from logits (M, K) by Sinkhorn-Knopp iterations.

    Starts from ``Q = exp(logits / teacher_temp)`` normalised to total mass 1 over the global batch of
    M_total rows (all ranks), then alternates: scale each prototype's column so that every prototype
    holds 1/K of the mass, scale each row so that every sample holds 1/M_total. The result is
    multiplied by M_total: each returned row sums to exactly 1 (a distribution over prototypes), and
    after enough iterations each prototype's column sums to M_total / K over the global batch.

    Each rank passes its own rows; M may differ between ranks (masked patch tokens) and may be 0.
    The iterations run on log Q in fp32, so no entry underflows to 0 or overflows, whatever the
    spread of the logits; the values equal those of the plain iterations (DINOv2, SwAV). They update
    one (M, K) fp32 tensor in place, which becomes the result: with ~10,000 masked patches x 65,536
    prototypes each such tensor is 2.6 GB, and a new one per step would double the peak.
    """
    log_q = teacher_logits.to(torch.float32, copy=True).div_(teacher_temp)  # one new tensor, never the caller's
    n_prototypes = log_q.shape[1]
    n_rows = all_reduce_(log_q.new_tensor(float(log_q.shape[0])))
    log_q.sub_(_global_logsumexp(log_q, dim=None))
    for _ in range(n_iterations):
        log_q.sub_(_global_logsumexp(log_q, dim=0)).sub_(math.log(n_prototypes))
        log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True)).sub_(torch.log(n_rows))
    return log_q.add_(torch.log(n_rows)).exp_()
