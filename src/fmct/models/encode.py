"""Whole-scan features of a backbone: what ``fmct embed``, fine-tuning's evaluation and pretraining's
online evaluation read from a ViT."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fmct.data.augment import embed_transform
from fmct.devices import autocast
from fmct.models.vit3d import ViT3D


@torch.no_grad()
def encode(
    model: ViT3D, hu: torch.Tensor, windows: Sequence[tuple[float, float]],
    forward_features: Callable[[torch.Tensor], dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS token and mean patch token, each float32 (B, embed_dim), of HU volumes (B, 1, X, Y, Z).

    ``hu`` lies on the model's device; each volume is resized whole to the model's ``img_size`` and
    windowed into channels (:func:`fmct.data.embed_transform`). ``forward_features`` replaces the
    model's own (e.g. a compiled one).
    """
    x = embed_transform(hu, model.config.img_size, windows)
    with autocast(x.device):
        tokens = (forward_features or model.forward_features)(x)
    return tokens["cls"].float(), tokens["patch"].float().mean(dim=1)
