"""A 3D Vision Transformer for CT volumes: 3D patch embedding (linear, or a convolutional stem), interpolated
position embedding, CLS and register tokens, LayerScale, stochastic depth, a mask token for masked image
modeling.

Input layout: ``(B, C, D, H, W)`` where C are the HU windows (brain, subdural, bone by default) and
(D, H, W) are the three spatial axes of the volume in the store's order, (x, y, z) = (R, A, S).
Patches are numbered row-major over the patch grid (D first, W fastest), the order of
``Conv3d(...).flatten(2)``; every (B, N) mask and every patch index in fmct uses this order.

Token sequence inside the transformer: ``[CLS, register_1 .. register_R, patch_1 .. patch_N]``. Only the
patch tokens get a position embedding: the CLS and register tokens are learned vectors of their own
and carry no location (registers as in "Vision Transformers Need Registers", Darcet et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fmct.errors import ConfigError, InputError

# embed_dim, depth, n_heads for each named size; the MLP hidden width is mlp_ratio * embed_dim.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class ViT3DConfig:
    """Architecture of a :class:`ViT3D`; saved as JSON beside the weights by :mod:`fmct.hub`.

    ``embed_dim``, ``depth`` and ``n_heads`` default to the values of ``size`` and can be overridden
    one by one (e.g. a 2-layer tiny model for a quick test). ``patch_size`` is in voxels per axis
    (D, H, W); an int means the same on all three axes. ``img_size`` is the volume size (voxels) the
    position embedding is learned for; other sizes that are multiples of the patch size also work.
    """

    size: str = "base"
    img_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: tuple[int, int, int] = (12, 12, 12)
    in_chans: int = 3
    n_registers: int = 4
    embed_dim: int | None = None
    depth: int | None = None
    n_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # LayerScale's initial per-channel gain on each residual branch; None switches LayerScale off.
    layerscale_init: float | None = 1e-5
    # Stochastic depth: the drop probability rises linearly from 0 (first block) to this (last block).
    drop_path_rate: float = 0.0
    # The patch embedding. Empty: one linear map of each patch (the ViT's). Channels c_1..c_k: a
    # convolutional stem of k stages that each halve the grid, so the patch must be 2^k voxels per axis:
    # a 2x2x2 stride-2 convolution to c_1 channels, then per c_i two 3x3x3 convolutions and a 2x
    # max-pool (every convolution followed by BatchNorm and ReLU); a 1x1x1 convolution makes the tokens.
    # Its 3x3x3 kernels see across patch borders: masked modelling therefore hides a patch's voxels in
    # the input (ViT3D.prepare_tokens), never only its token.
    stem_channels: tuple[int, ...] = ()
    # The stem's first stage: False, the 2x2x2 stride-2 convolution (cheap: a CPU spends most of a
    # stem's time at full resolution); True, two 3x3x3 convolutions and a 2x max-pool like the other
    # stages, so that the first features see single voxels and their neighbours (a plain 3D CNN's start).
    stem_full_resolution: bool = False
    # The synthetic-anomaly pretext's two linear heads (:class:`ChangeHeads`), kept with the backbone so
    # that its output, the model's own score that a scan holds a change, travels with the weights (set by
    # PretrainConfig for method anomaly; False for every other backbone).
    change_heads: bool = False
    # What the change heads tell apart, one logit each: 1, any change; 2, a hyperdense change and a
    # hypodense one, in that order (acute blood adds density, an infarct or a widened CSF space removes
    # it). Set by PretrainConfig from ``anomaly.signed``.
    change_kinds: int = 1

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"unknown ViT size {self.size!r} (known: {', '.join(SIZES)})")
        if isinstance(self.patch_size, int):
            self.patch_size = (self.patch_size,) * 3
        if self.change_kinds not in (1, 2):
            raise ConfigError(
                f"change_kinds must be 1 (any change) or 2 (hyperdense, hypodense), got {self.change_kinds}"
            )
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        embed_dim, depth, n_heads = SIZES[self.size]
        self.embed_dim = self.embed_dim or embed_dim
        # depth 0 is a model of its own: the stem's tokens, normalised (a 3D CNN behind the ViT's interface)
        self.depth = depth if self.depth is None else int(self.depth)
        self.n_heads = self.n_heads or n_heads
        if len(self.patch_size) != 3 or len(self.img_size) != 3:
            raise ConfigError(
                f"patch_size and img_size need 3 values (D, H, W), got {self.patch_size}, {self.img_size}"
            )
        if self.depth < 0:
            raise ConfigError(f"depth {self.depth}: the number of transformer blocks, 0 or more")
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of n_heads {self.n_heads}")
        grid_of(self.img_size, self.patch_size)  # raises when img_size is not a multiple of the patch
        self.stem_channels = tuple(int(c) for c in self.stem_channels or ())
        if self.stem_channels and any(p != 2 ** len(self.stem_channels) for p in self.patch_size):
            raise ConfigError(
                f"a convolutional stem of {len(self.stem_channels)} stages makes patches of "
                f"{2 ** len(self.stem_channels)} voxels, but patch_size is {list(self.patch_size)}"
            )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patches per axis (D, H, W) for ``img_size``."""
        return grid_of(self.img_size, self.patch_size)

    @property
    def n_patches(self) -> int:
        return math.prod(self.grid_size)


def grid_of(spatial_size: Iterable[int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patch grid (D, H, W) of a volume of ``spatial_size`` voxels; each size must be a multiple of the patch."""
    spatial_size = tuple(int(s) for s in spatial_size)
    if any(s % p for s, p in zip(spatial_size, patch_size)) or len(spatial_size) != 3:
        raise ValueError(f"volume size {spatial_size} (voxels) is not a multiple of the patch size {patch_size}")
    return tuple(s // p for s, p in zip(spatial_size, patch_size))


# ------------------------------------------------------------------------------- position embedding
def sincos_pos_embed_3d(grid_size: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sine-cosine position embedding, shape (D*H*W, dim), rows in patch order.

    A third of the channels (rounded down to an even count) encodes each axis with sines and cosines of
    the patch index at geometrically spaced frequencies (1 down to 1/10000); channels left over when
    ``dim`` is not a multiple of 6 are zero.
    """
    per_axis = 2 * (dim // 6)
    frequencies = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(per_axis // 2, 1))
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid_size), indexing="ij")
    parts = []
    for axis_coords in coords:
        angles = axis_coords.reshape(-1, 1) * frequencies
        parts += [torch.sin(angles), torch.cos(angles)]
    embed = torch.cat(parts, dim=1)
    embed = F.pad(embed, (0, dim - embed.shape[1]))
    return embed.float()


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Resample a (1, N, C) patch position embedding from ``old_grid`` to ``new_grid`` (trilinear).

    Each embedding is treated as a field sampled at patch centres (``align_corners=False``), so a local
    crop of 48^3 voxels with the same patch size sees the embedding of the whole 96^3 field at half the
    resolution. The same grid returns the input unchanged.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    field = pos_embed.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)
    # Interpolate in fp32: under bf16 autocast the field would lose precision between grid points.
    field = F.interpolate(field.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
    return field.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos_embed.dtype)


def hidden_of(keep_idx: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(B, N) bool mask, True for the patches not in ``keep_idx`` (B, N')."""
    hidden = torch.ones(keep_idx.shape[0], n_patches, dtype=torch.bool, device=keep_idx.device)
    return hidden.scatter(1, keep_idx, False)


def hidden_voxels(masks: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, N) patch mask in patch order -> (B, 1, D, H, W) voxel mask, True inside the masked patches."""
    voxels = masks.reshape(masks.shape[0], 1, *grid)
    for axis, size in enumerate(patch_size):
        voxels = voxels.repeat_interleave(size, dim=2 + axis)
    return voxels


# ----------------------------------------------------------------------------------------- blocks
class PatchEmbed3D(nn.Module):
    """3D patches -> tokens: (B, C, D, H, W) -> (B, N, embed_dim), N in patch order.

    Without ``stem_channels``, one linear map of each non-overlapping patch. With them, a small 3D CNN
    (see :attr:`ViT3DConfig.stem_channels`) whose output voxel (i, j, k) becomes patch (i, j, k)'s token:
    the convolutions give every token the local, translation-equivariant view of edges and blobs that a
    ViT trained on a few hundred volumes does not learn by itself.
    """

    def __init__(
        self,
        patch_size: tuple[int, int, int],
        in_chans: int,
        embed_dim: int,
        stem_channels: tuple[int, ...] = (),
        full_resolution: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        channels = in_chans
        for stage, width in enumerate(stem_channels):
            if stage == 0 and not full_resolution:  # a CPU spends its time at full resolution: halve it first
                layers += [
                    nn.Conv3d(channels, width, 2, stride=2, bias=False),
                    nn.BatchNorm3d(width),
                    nn.ReLU(inplace=True),
                ]
            else:
                for conv_in in (channels, width):
                    layers += [
                        nn.Conv3d(conv_in, width, 3, padding=1, bias=False),
                        nn.BatchNorm3d(width),
                        nn.ReLU(inplace=True),
                    ]
                layers.append(nn.MaxPool3d(2))
            channels = width
        self.stem = nn.Sequential(*layers)
        kernel = (1, 1, 1) if stem_channels else patch_size
        self.proj = nn.Conv3d(channels, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.stem):
            # Channels-last activations: the CPU's 3D convolutions run 1.3x faster (benchmarks/cpu_step.py).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, n_tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch, starting small so that deep models begin near identity."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for whole samples with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        # Scale the kept samples so the branch's expected output is unchanged.
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LayerScale(Attn(LN x))), then the same with the MLP."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, n_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


# ------------------------------------------------------------------------------------------ model
class ChangeHeads(nn.Module):
    """Two linear heads on a backbone's normalised output tokens (:mod:`fmct.ssl.anomaly` trains them):
    ``patch``, per patch token ``kinds`` logits that its patch holds a painted change of each kind, and
    ``scan``, ``kinds`` logits on the CLS that the scan holds any (kinds: ``ViT3DConfig.change_kinds``)."""

    def __init__(self, dim: int, kinds: int = 1):
        super().__init__()
        self.patch = nn.Linear(dim, kinds)
        self.scan = nn.Linear(dim, kinds)


class ViT3D(nn.Module):
    """3D ViT backbone. ``forward(x)`` returns the CLS embedding (B, embed_dim) of volumes (B, C, D, H, W).

    Any input whose spatial size is a multiple of the patch size works (the position embedding is
    interpolated), e.g. 96^3 global and 48^3 local crops with patch 12.
    """

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.n_registers = config.n_registers
        self.patch_embed = PatchEmbed3D(
            config.patch_size, config.in_chans, dim, config.stem_channels, config.stem_full_resolution
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.n_registers, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        drop_rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(dim, config.n_heads, config.mlp_ratio, config.qkv_bias, config.layerscale_init, rate)
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Built on the meta device (hub.load), the weights come from a file: a random init is wasted time.
        if not self.pos_embed.is_meta:
            self._init_weights()
        # After the initialisation, so that the blocks draw the same weights with and without them.
        self.change_head = ChangeHeads(dim, config.change_kinds) if config.change_heads else None

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def _init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_3d(self.config.grid_size, self.embed_dim).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        # The patch projection is a linear map of the flattened patch: initialise it like one.
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for module in self.patch_embed.stem.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Volumes (B, C, D, H, W) -> token sequence (B, 1 + R + N', embed_dim) before the blocks.

        ``masks`` (B, N) bool: True patches have their embedding replaced by the mask token (iBOT);
        they keep their position embedding. ``keep_idx`` (B, N') long: only these patches enter the
        sequence (MAE's visible patches), so the encoder's cost scales with N'. At most one of the two.
        With a convolutional stem the hidden patches' voxels are also set to 0 before the stem, so that no
        visible token sees into a hidden patch through a kernel that crosses its border.
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_chans:
            raise InputError(
                f"expected volumes (B, {self.config.in_chans}, D, H, W) of windowed channels, got shape "
                f"{tuple(x.shape)}; canonical HU volumes (B, 1, X, Y, Z) go through preprocess(hu) first"
            )
        if masks is not None and keep_idx is not None:
            raise ValueError("pass either masks (iBOT) or keep_idx (MAE), not both")
        grid = grid_of(x.shape[2:], self.config.patch_size)
        if self.config.stem_channels and (masks is not None or keep_idx is not None):
            x = x * ~hidden_voxels(
                masks if masks is not None else hidden_of(keep_idx, math.prod(grid)), grid, self.config.patch_size
            )
        patches = self.patch_embed(x)
        if masks is not None:
            if masks.shape != patches.shape[:2]:
                raise ValueError(f"masks shape {tuple(masks.shape)} != (batch, patches) {tuple(patches.shape[:2])}")
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        patches = patches + interpolate_pos_embed(self.pos_embed, self.config.grid_size, grid)
        if keep_idx is not None:
            patches = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        batch = x.shape[0]
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(batch, -1, -1)
        return torch.cat([prefix.to(patches.dtype), patches], dim=1)

    def forward_features(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalised output tokens of volumes ``x`` (B, C, D, H, W).

        Returns ``{"cls": (B, C), "registers": (B, R, C), "patch": (B, N, C)}`` with C = embed_dim and N
        the patch count in patch order (or N' = keep_idx.shape[1] visible patches, in keep_idx order),
        and for a backbone with change heads also ``"change"`` (B, K): the scan head's logits that the
        scan holds a change of each of its K kinds (``config.change_kinds``). See :meth:`prepare_tokens`
        for ``masks`` and ``keep_idx``.
        """
        tokens = self.prepare_tokens(x, masks, keep_idx)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        out = {
            "cls": tokens[:, 0],
            "registers": tokens[:, 1 : 1 + self.n_registers],
            "patch": tokens[:, 1 + self.n_registers :],
        }
        if self.change_head is not None:
            out["change"] = self.change_head.scan(out["cls"])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS embedding (B, embed_dim) of volumes (B, C, D, H, W)."""
        return self.forward_features(x)["cls"]

    # ------------------------------------------------------------------- optimiser parameter groups
    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise LR decay: 0 embeddings and tokens, i + 1 block i,
        depth + 1 final norm and change heads."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(("norm.", "change_head.")):
            return self.config.depth + 1
        return 0

    def param_groups(
        self, weight_decay: float, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict]:
        """AdamW parameter groups with layer-wise LR decay and no weight decay where it does harm.

        Each group holds ``params`` (and their ``names``), ``lr_scale`` = ``layer_decay ** (depth + 1 - layer_id)``
        (1 for the final norm, smallest for the patch embedding, whose scale is further multiplied by
        ``patch_embed_lr_mult``: DINOv2 trains it 5x slower), ``wd_scale`` (0 for norms, biases, LayerScale
        gains, position embedding, CLS/register/mask tokens; 1 otherwise) and ``weight_decay`` =
        ``weight_decay * wd_scale``. A trainer sets ``lr = base_lr * lr_scale`` and
        ``weight_decay = wd * wd_scale`` for each group at each step.
        """
        top = self.config.depth + 1

        def lr_scale_of(name: str) -> float:
            scale = layer_decay ** (top - self.layer_id(name))
            return scale * patch_embed_lr_mult if name.startswith("patch_embed.") else scale

        return grouped_parameters(self.named_parameters(), lr_scale_of=lr_scale_of, weight_decay=weight_decay)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: weight matrices and conv kernels only, not norms, biases, gains,
    embeddings or tokens."""
    no_decay_names = ("pos_embed", "cls_token", "register_tokens", "mask_token")
    return param.ndim >= 2 and not any(part in name for part in no_decay_names)


def grouped_parameters(
    named_parameters: Iterator[tuple[str, nn.Parameter]], lr_scale_of: Callable[[str], float], weight_decay: float
) -> list[dict]:
    """Group trainable parameters by (lr_scale, wd_scale) into optimizer groups (see :meth:`ViT3D.param_groups`)."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr_scale = float(lr_scale_of(name))
        wd_scale = 1.0 if decays(name, param) else 0.0
        group = groups.setdefault(
            (lr_scale, wd_scale),
            {
                "params": [],
                "names": [],
                "lr_scale": lr_scale,
                "wd_scale": wd_scale,
                "weight_decay": weight_decay * wd_scale,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_vit3d(config: ViT3DConfig) -> ViT3D:
    """A freshly initialised :class:`ViT3D` for ``config``."""
    return ViT3D(config)
