"""DINO self-distillation loss on CLS tokens across multi-crop views (Caron et al. 2021; DINOv2 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy from teacher probabilities of the global crops to student predictions of all crops.

    For teacher crop t and student crop s (s != t: a crop is never its own target), the pair's loss is
    the mean over images b of ``-sum_k P[t, b, k] * log softmax(S[s, b] / student_temp)[k]``; the
    result is the mean over all such pairs.

    Hand check, 1 image, 2 prototypes, student_temp 1, crops 0 and 1 global (teacher sees both):
    teacher P = [[1, 0], [0.5, 0.5]], student logits S = [[0, 0], [ln 3, 0]] so that the student's
    log-probabilities are [ln .5, ln .5] for crop 0 and [ln .75, ln .25] for crop 1. Pairs (t=0, s=1):
    -ln .75 = 0.2877; (t=1, s=0): -(.5 ln .5 + .5 ln .5) = 0.6931. Loss = (0.2877 + 0.6931) / 2 = 0.4904.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp

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
        # fp32 even under autocast: einsum would otherwise sum the 65536 prototype terms in bf16.
        with torch.autocast(student_logits.device.type, enabled=False):
            student_log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            # cross_entropy[t, s]: mean over images of -sum_k P[t] log Q[s], for every pair at once.
            cross_entropy = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), student_log_probs) / batch
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
        n_pairs = n_teacher * n_student - n_teacher
        return cross_entropy.masked_fill(same_view, 0.0).sum() / n_pairs
