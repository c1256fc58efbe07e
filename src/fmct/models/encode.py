"""Whole-scan features of a backbone: what ``fmct embed``, a probe detector and pretraining's online
evaluation read from a ViT.

A scan's features are its backbone's output tokens pooled over the scan
(:func:`fmct.models.classifier.pooled_features`, the one home of the pooling), each float32 (B, embed_dim)
in the units of the backbone's final norm, named as the embeddings table names them (:data:`FEATURES`):
``cls`` (the CLS token), ``patch_mean`` and ``patch_max`` (the mean and the maximum over the patch tokens,
per channel). Register tokens are left out. A backbone pretrained on synthetic anomalies adds ``change``
(B, K): its change heads' logits that the scan holds a change of each of K kinds
(:class:`fmct.models.vit3d.ChangeHeads`), one or two numbers a probe fitted on a handful of labels can read.
"""

from __future__ import annotations

from typing import Callable

import torch

from fmct.devices import autocast
from fmct.models.classifier import pooled_features
from fmct.models.vit3d import ViT3D

FEATURES = ("cls", "patch_mean", "patch_max")  # every backbone's
OPTIONAL_FEATURES = ("change",)  # only a backbone with change heads has it
# A feature set is features side by side, in this order (a probe and the probe detector built from it read
# the same): each feature alone, ``concat`` (``cls`` | ``patch_mean``, DINOv2's linear evaluation) and
# ``cls_mean_max`` (``cls`` | ``patch_mean`` | ``patch_max``).
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "cls": ("cls",),
    "patch_mean": ("patch_mean",),
    "patch_max": ("patch_max",),
    "concat": ("cls", "patch_mean"),
    "cls_mean_max": ("cls", "patch_mean", "patch_max"),
    "change": ("change",),
}


def feature_names(model: ViT3D) -> tuple[str, ...]:
    """The features :func:`encode` gives for ``model``: :data:`FEATURES`, and ``change`` with change heads."""
    return FEATURES + (OPTIONAL_FEATURES if model.change_head is not None else ())


def scan_features(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The :data:`FEATURES` of a backbone's ``forward_features`` output (``cls`` (B, C), ``patch`` (B, N, C)),
    each float32 (B, C), and ``change`` (B, K) where the output has it; pooled in float32 whatever the
    tokens' precision. Differentiable."""
    pooled = pooled_features({"cls": tokens["cls"].float(), "patch": tokens["patch"].float()})
    features = {"cls": pooled["cls"], "patch_mean": pooled["mean"], "patch_max": pooled["max"]}
    if "change" in tokens:
        features["change"] = tokens["change"].float()
    return features


@torch.no_grad()
def encode(
    model: ViT3D, x: torch.Tensor, forward_features: Callable[[torch.Tensor], dict] | None = None
) -> dict[str, torch.Tensor]:
    """The features (:func:`scan_features`), each float32 (B, embed_dim) or (B, 1), of model inputs ``x``
    (B, channels, *img_size): whole volumes resized and windowed (:func:`fmct.models.windows.model_input`).

    The forward pass runs under :func:`fmct.devices.autocast` (bf16 on CUDA, fp32 on the CPU) on ``x``'s
    device; ``forward_features`` replaces the model's own (e.g. a compiled one).
    """
    with autocast(x.device):
        tokens = (forward_features or model.forward_features)(x)
    return scan_features(tokens)
