"""iBOT masked-image-modeling loss on patch tokens (Zhou et al. 2022), with DINOv2's per-image weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmct.ssl.chunked import chunked_sum


class iBOTPatchLoss(nn.Module):
    """Cross-entropy from teacher to student on the masked patch tokens only.

    The student sees a global crop with some patches replaced by the mask token; the teacher sees the
    same crop unmasked. Each masked token's loss ``-sum_k P[k] log softmax(S / student_temp)[k]`` is
    averaged over the masked tokens of its image, and these per-image means are summed and divided by
    the number of images B in ``masks``. As in DINOv2, an image without masked tokens counts as 0, so
    the loss scales with the share of images that are masked.

    Hand check, student_temp 1, 2 prototypes, masks [[T, T, F], [F, F, F]] (B = 2): tokens with
    per-token cross-entropies 0.2 and 0.4 in image 0 give (0.2 + 0.4) / 2 = 0.3 for image 0, 0 for
    image 1, loss = 0.3 / 2 = 0.15.

    ``chunk_rows`` > 0 computes the loss over that many masked tokens at a time, recomputing each
    chunk in the backward pass (:func:`fmct.ssl.chunked.chunked_sum`): the same value and gradients,
    with the (M, out_dim) float32 intermediates of one chunk instead of all M tokens.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, chunk_rows: int = 0):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.chunk_rows = chunk_rows

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Loss (nats) over the masked tokens.

        Args:
            student_logits: (M, out_dim) head outputs of the masked patch tokens, M = masks.sum(), in the
                order of ``patch_tokens[masks]`` (image by image, patch order within an image).
            teacher_probs: (M, out_dim) teacher probabilities of the same tokens, without gradient.
            masks: (B, N) bool, True where the student's patch was masked.
        """
        n_masked = int(masks.sum())
        expected = (n_masked, self.out_dim)
        if tuple(student_logits.shape) != expected or tuple(teacher_probs.shape) != expected:
            raise ValueError(
                f"iBOT loss: student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} "
                f"must both be (masked tokens, out_dim) = {expected}"
            )
        tokens_per_image = masks.sum(dim=1, keepdim=True).clamp(min=1)
        # Each token's share of the loss: 1 / (its image's masked tokens x images).
        token_weight = (1.0 / (tokens_per_image * masks.shape[0])).expand_as(masks)[masks]
        return chunked_sum(self._weighted_cross_entropy, (student_logits, teacher_probs, token_weight), self.chunk_rows)

    def _weighted_cross_entropy(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, token_weight: torch.Tensor
    ) -> torch.Tensor:
        # sum over tokens of weight * -sum_k P[k] log softmax(S / student_temp)[k], in fp32.
        student_log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        token_loss = -(teacher_probs.float() * student_log_probs).sum(dim=-1)
        return (token_loss * token_weight).sum()
