"""The model input: canonical HU volumes to windowed channels, the one preprocessing every backbone sees.

A backbone reads C channels in [0, 1], one per (level, width) HU window: channel c is
``clip(hu, level - width/2, level + width/2)`` mapped linearly to [0, 1]. A model folder records its
windows (:mod:`fmct.hub`); :data:`DEFAULT_WINDOWS` (brain, subdural, bone, as FM-CT) when none is recorded.
Inference resizes the whole canonical volume to the backbone's input (:func:`model_input`); training
views are random crops of it with jittered windows (:class:`fmct.data.MultiCropAugment`), through the
same :func:`apply_windows`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmct.errors import InputError

DEFAULT_WINDOWS = [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]  # (level, width) HU: brain, subdural, bone
BRAIN_WINDOW, SUBDURAL_WINDOW, BONE_WINDOW = DEFAULT_WINDOWS  # also how fmct's images show a slice (display_range)


def display_range(window: tuple[float, float]) -> tuple[float, float]:
    """The HU shown black .. white in a (level, width) window: the brain window (40, 80) -> (0, 80)."""
    level, width = window
    return level - width / 2, level + width / 2


def apply_windows(hu: torch.Tensor, level: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """HU (N, 1, ...) float with a level and width (N, C) HU per row -> (N, C, ...) in [0, 1]."""
    # clip(hu, level -+ width/2) scaled to [0, 1] as hu / width + (0.5 - level / width) in one broadcast
    # pass, then clamped in place.
    shape = level.shape + (1,) * (hu.dim() - 2)
    inverse_width = (1 / width).view(shape)
    offset = (0.5 - level / width).view(shape)
    return torch.addcmul(offset, hu, inverse_width).clamp_(0, 1)


def window_channels(hu: torch.Tensor, windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS) -> torch.Tensor:
    """HU (N, 1, ...) float -> (N, C, ...) in [0, 1], one channel per (level, width) window in HU.

    In the brain window (40, 80): 0 HU -> 0, 40 HU -> 0.5, 80 HU -> 1.
    """
    table = torch.tensor(windows, dtype=hu.dtype, device=hu.device)
    n = hu.shape[0]
    return apply_windows(hu, table[:, 0].expand(n, -1), table[:, 1].expand(n, -1))


def hu_batch(hu: torch.Tensor | np.ndarray) -> torch.Tensor:
    """HU volumes as a batch (B, 1, X, Y, Z): a numpy or torch (X, Y, Z), (B, X, Y, Z) or (B, 1, X, Y, Z)."""
    hu = torch.as_tensor(hu)
    if hu.dim() == 3:
        return hu[None, None]
    if hu.dim() == 4:
        return hu[:, None]
    if hu.dim() == 5 and hu.shape[1] == 1:
        return hu
    raise InputError(f"expected HU volumes (X, Y, Z), (B, X, Y, Z) or (B, 1, X, Y, Z), got shape {list(hu.shape)}")


@torch.no_grad()
def model_input(
    hu: torch.Tensor, size: int | Sequence[int] = 96, windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS
) -> torch.Tensor:
    """The deterministic model input for inference: the whole volume resized, windows to channels.

    ``hu`` (B, 1, X, Y, Z) HU, any dtype and device -> float32 (B, C, *size) in [0, 1], trilinear
    (align_corners=False, the same sampling as a full-volume crop of :class:`fmct.data.MultiCropAugment`).
    """
    if hu.dim() != 5 or hu.shape[1] != 1:
        raise InputError(f"expected an HU batch (B, 1, X, Y, Z), got shape {list(hu.shape)}")
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    with torch.autocast(hu.device.type, enabled=False):
        resized = F.interpolate(hu.float(), size=size, mode="trilinear", align_corners=False)
        return window_channels(resized, windows)
