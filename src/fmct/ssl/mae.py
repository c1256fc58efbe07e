"""Masked autoencoding (He et al. 2022) for 3D volumes: random patch masking, a light decoder, and the
normalised-pixel reconstruction loss. The encoder is :class:`fmct.models.ViT3D` run on the visible
patches only (``forward_features(x, keep_idx=...)``), so with 75% masking it costs a quarter of a full pass.

Patch order everywhere is the ViT's: row-major over the patch grid (D, H, W). A patch's pixel vector
is its voxels flattened in (channel, d, h, w) order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fmct.models.vit3d import Block, grid_of, sincos_pos_embed_3d


def _as_triple(patch: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (patch,) * 3 if isinstance(patch, int) else tuple(patch)


def patchify3d(volume: torch.Tensor, patch: int | tuple[int, int, int]) -> torch.Tensor:
    """Volumes (B, C, D, H, W) -> patches (B, N, C * pd * ph * pw), N = (D/pd)(H/ph)(W/pw) in ViT patch order."""
    pd, ph, pw = _as_triple(patch)
    batch, channels = volume.shape[:2]
    gd, gh, gw = grid_of(volume.shape[2:], (pd, ph, pw))
    blocks = volume.reshape(batch, channels, gd, pd, gh, ph, gw, pw)
    return blocks.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, gd * gh * gw, channels * pd * ph * pw)


def unpatchify3d(
    patches: torch.Tensor, grid: tuple[int, int, int], patch: int | tuple[int, int, int], channels: int
) -> torch.Tensor:
    """Inverse of :func:`patchify3d`: patches (B, N, C * pd * ph * pw) -> volumes (B, C, D, H, W)."""
    pd, ph, pw = _as_triple(patch)
    gd, gh, gw = grid
    batch = patches.shape[0]
    blocks = patches.reshape(batch, gd, gh, gw, channels, pd, ph, pw)
    return blocks.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, channels, gd * pd, gh * ph, gw * pw)


class MaskSplit(NamedTuple):
    """Which patches an MAE encoder sees. All indices are patch indices in ViT patch order."""

    keep_idx: torch.Tensor  # (B, n_keep) long: visible patches, in random order
    restore_idx: torch.Tensor  # (B, N) long: gathers [visible, masked] tokens back into patch order
    mask: torch.Tensor  # (B, N) bool: True where the patch is hidden from the encoder


def random_masking(
    batch_size: int,
    n_patches: int,
    mask_ratio: float = 0.75,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MaskSplit:
    """Hide ``round(mask_ratio * n_patches)`` patches per image, chosen uniformly and independently per image.

    At least one patch stays visible. ``generator`` must live on ``device`` when given.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_keep = max(1, n_patches - round(mask_ratio * n_patches))
    noise = torch.rand(batch_size, n_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore_idx = shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, n_patches, dtype=torch.bool, device=noise.device)
    mask[:, :n_keep] = False
    return MaskSplit(shuffle[:, :n_keep], restore_idx, torch.gather(mask, 1, restore_idx))


class MAEDecoder(nn.Module):
    """Light transformer that predicts every patch's pixels from the encoder's visible tokens.

    The visible tokens (B, n_keep, encoder_dim) are projected to ``decoder_dim``, a learned mask token
    fills the hidden positions, a fixed 3D sin-cos position embedding of ``grid_size`` is added, then
    ``depth`` transformer blocks, a LayerNorm and a linear layer give (B, N, patch_dim) predictions.
    FM-CT's decoder was 8 blocks of width 768 (16 heads); the default here is lighter, as in MAE's
    ablations where a narrow, shallow decoder does as well for linear probing.
    """

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        grid_size: tuple[int, int, int],
        decoder_dim: int = 384,
        depth: int = 4,
        n_heads: int = 6,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "pos_embed", sincos_pos_embed_3d(self.grid_size, decoder_dim).unsqueeze(0), persistent=False
        )
        self.blocks = nn.ModuleList(Block(decoder_dim, n_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.predict = nn.Linear(decoder_dim, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, visible_tokens: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, N, patch_dim) in patch order from visible tokens (B, n_keep, encoder_dim)."""
        batch, n_keep, _ = visible_tokens.shape
        n_patches = restore_idx.shape[1]
        if n_patches != math.prod(self.grid_size):
            raise ValueError(
                f"MAE decoder built for grid {self.grid_size} ({math.prod(self.grid_size)} patches), got {n_patches}"
            )
        x = self.embed(visible_tokens)
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(batch, n_patches - n_keep, -1)], dim=1)
        x = torch.gather(x, 1, restore_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))


def mae_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error over the hidden patches.

    Args:
        pred: (B, N, P) predicted patches.
        target_patches: (B, N, P) true patches (:func:`patchify3d` of the input volumes).
        mask: (B, N) bool, True for hidden patches; only they count.
        norm_pix: standardise each target patch to mean 0 and variance 1 over its P values first
            (MAE's normalised-pixel target; eps 1e-6 added to the variance).

    The loss is the per-patch mean of squared errors averaged over all hidden patches of the batch.
    Hand check, norm_pix False, P = 2: pred 0, targets [1, 3] (hidden) and [5, 5] (visible) give
    (1 + 9) / 2 = 5.
    """
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = F.mse_loss(pred.float(), target, reduction="none").mean(dim=-1)
    weights = mask.float()
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
