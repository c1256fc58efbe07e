"""DINO self-distillation loss on CLS tokens across multi-crop views (Caron et al. 2021; DINOv2 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmct.ssl.chunked import chunked_sum


class DINOLoss(nn.Module):
    """Cross-entropy from teacher probabilities of the global crops to student predictions of all crops.

    For teacher crop t and student crop s (s != t: a crop is never its own target), the pair's loss is
    the mean over images b of ``-sum_k P[t, b, k] * log softmax(S[s, b] / student_temp)[k]``; the
    result is the mean over all such pairs.

    Hand check, 1 image, 2 prototypes, student_temp 1, crops 0 and 1 global (teacher sees both):
    teacher P = [[1, 0], [0.5, 0.5]], student logits S = [[0, 0], [ln 3, 0]] so that the student's
    log-probabilities are [ln .5, ln .5] for crop 0 and [ln .75, ln .25] for crop 1. Pairs (t=0, s=1):
    -ln .75 = 0.2877; (t=1, s=0): -(.5 ln .5 + .5 ln .5) = 0.6931. Loss = (0.2877 + 0.6931) / 2 = 0.4904.

    ``chunk_size`` > 0 computes the loss over that many images at a time (all their crops), recomputing
    each chunk in the backward pass (:func:`fmct.ssl.chunked.chunked_sum`): the same value and
    gradients, with the float32 intermediates of one chunk of images instead of the whole batch.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, chunk_size: int = 0):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.chunk_size = chunk_size

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over (teacher crop, student crop) pairs of different views.

        Args:
            student_logits: (n_student_crops, B, out_dim) raw head outputs for all crops; the first
                ``n_teacher_crops`` crops are the global crops, in the teacher's order.
            teacher_probs: (n_teacher_crops, B, out_dim) centred and sharpened teacher probabilities
                (see :mod:`fmct.ssl.centering`), without gradient.

        Returns:
            A scalar loss (nats).
        """
        n_teacher, batch, out_dim = teacher_probs.shape
        n_student = student_logits.shape[0]
        if student_logits.shape[1:] != teacher_probs.shape[1:] or out_dim != self.out_dim or n_student < n_teacher:
            raise ValueError(
                f"DINO loss: student logits {tuple(student_logits.shape)} and teacher probabilities "
                f"{tuple(teacher_probs.shape)} must be (crops, B, {self.out_dim}) with at least as many student crops"
            )
        n_pairs = n_teacher * n_student - n_teacher
        pair_sums = chunked_sum(self._pair_cross_entropy_sums, (student_logits, teacher_probs), self.chunk_size, dim=1)
        return pair_sums / (batch * n_pairs)

    def _pair_cross_entropy_sums(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        # Sum over the images b and the pairs (t, s != t) of -sum_k P[t, b, k] log Q[s, b, k].
        # fp32 even under autocast: einsum would otherwise sum the 65536 prototype terms in bf16.
        with torch.autocast(student_logits.device.type, enabled=False):
            student_log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            cross_entropy = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), student_log_probs)
        n_teacher, n_student = cross_entropy.shape
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
        return cross_entropy.masked_fill(same_view, 0.0).sum()
