"""Synthetic-anomaly pretraining (``method: anomaly``): find where a head's density was changed.

Half of the volumes (by default) get one to three smooth ellipsoids of added density inside the head,
hyperdense or hypodense, of a few millimetres to a few centimetres; the backbone learns, from the
changed volume alone, which of its patches hold a change (a logit per patch token) and whether the
scan holds any (a logit on the CLS). With ``signed`` it learns a hyperdense change and a hypodense one
apart, a logit for each: on validation heads the single logit also rises with atrophy, infarcts and
hydrocephalus (widened CSF spaces and lost density), which an older population holds more of than a
bleed. No label is read: the targets are where the pretext put its
changes. It is the self-supervised family of CutPaste (Li et al. 2021) and foreign-patch interpolation
(Tan et al. 2021), which learns what normal anatomy looks like in order to tell a local change from it.
Acute blood is a hyperdense change and an infarct a hypodense one, so this pretext is close to the
findings that fmct detects; BENCHMARKS.md says what that does and does not show.

Frame and units: HU volumes (B, 1, X, Y, Z) on the store's grid, RAS axes, ``spacing_mm`` isotropic
voxels; a change is an offset in HU, its size semi-axes in mm.

A change goes only where it is soft tissue inside the head (:func:`paintable_region`): between
:data:`SOFT_TISSUE_HU` HU, at least ``air_margin_mm`` from air (which keeps it off the scalp, whose soft
tissue touches the air outside the head) and not touching bone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fmct.ssl.config import AnomalyConfig

SOFT_TISSUE_HU = (-15.0, 95.0)  # CSF to acute blood: the densities a change may start from
AIR_HU = -200.0  # below this a voxel counts as air
BONE_HU = 250.0  # above this, as bone


def paintable_region(hu: torch.Tensor, spacing_mm: float, air_margin_mm: float) -> torch.Tensor:
    """Where a change may go in HU volumes ``hu`` (B, 1, X, Y, Z): bool of the same shape.

    Soft tissue (:data:`SOFT_TISSUE_HU`) that is at least ``air_margin_mm`` (rounded to whole voxels of
    ``spacing_mm``) from any air voxel along each axis, and whose 3×3×3 neighbourhood holds no bone.
    """
    radius = max(1, round(air_margin_mm / spacing_mm))
    near_air = _within(hu < AIR_HU, radius)
    near_bone = _within(hu > BONE_HU, 1)
    low, high = SOFT_TISSUE_HU
    return ~near_air & ~near_bone & (hu > low) & (hu < high)


def _within(mask: torch.Tensor, radius: int) -> torch.Tensor:
    # True where a True voxel of ``mask`` (B, 1, X, Y, Z) bool lies in the (2r + 1)^3 cube around: the
    # mask OR-ed with its shifts along one axis after the other (a separable dilation; on a CPU some 30
    # times faster than a stride-1 max-pool).
    for dim in (2, 3, 4):
        n = mask.shape[dim]
        dilated = mask.clone()
        for shift in range(1, min(radius, n - 1) + 1):
            dilated.narrow(dim, 0, n - shift).logical_or_(mask.narrow(dim, shift, n - shift))
            dilated.narrow(dim, shift, n - shift).logical_or_(mask.narrow(dim, 0, n - shift))
        mask = dilated
    return mask


class ChangeDraws(NamedTuple):
    """The random parameters of one batch's changes, one row per volume, ``m`` = ``max_changes`` slots."""

    active: torch.Tensor  # (B,) bool: the volume gets changes
    count: torch.Tensor  # (B,) long in 1..m: how many slots are used
    centre: torch.Tensor  # (B, m) in [0, 1): which paintable voxel (as a fraction of their count) is the centre
    semi_axes_mm: torch.Tensor  # (B, m, 3)
    rotation: torch.Tensor  # (B, m, 3, 3) orthogonal
    softness: torch.Tensor  # (B, m): edge width, as a fraction of the normalised radius
    delta_hu: torch.Tensor  # (B, m): signed HU offset at the centre
    noise_seed: torch.Tensor  # (B,) long: the seed of the volume's edge roughness


def draw_changes(config: AnomalyConfig, global_batch: int, generator: torch.Generator | None) -> ChangeDraws:
    """Parameters for the volumes of a global batch, drawn on the CPU from ``generator`` in a fixed order
    whatever the settings (so a rank keeps its volumes' rows of the same draws)."""
    n, m = global_batch, config.max_changes

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator, dtype=torch.float64)

    active = uniform(0, 1) < config.probability
    count = 1 + (uniform(0, 1) * m).long().clamp(max=m - 1)
    centre = uniform(0, 1, m)
    semi_axes_mm = uniform(*config.semi_axis_mm, m, 3)
    rotation = torch.linalg.qr(torch.randn(n, m, 3, 3, generator=generator, dtype=torch.float64))[0]
    softness = uniform(*config.edge_softness, m)
    magnitude = uniform(*config.delta_hu, m)
    sign = torch.where(uniform(0, 1, m) < config.hyperdense_share, 1.0, -1.0)
    noise_seed = torch.randint(0, 2**62, (n,), generator=generator)
    return ChangeDraws(active, count, centre, semi_axes_mm, rotation, softness, magnitude * sign, noise_seed)


@torch.no_grad()
def paint_changes(
    hu: torch.Tensor,
    spacing_mm: float,
    config: AnomalyConfig,
    generator: torch.Generator | None = None,
    first_volume: int = 0,
    global_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add synthetic changes to HU volumes ``hu`` (B, 1, X, Y, Z), voxels of ``spacing_mm``.

    Returns float32 ``changed_hu`` (B, 1, X, Y, Z) and ``visibility`` (B, K, X, Y, Z): ``changed_hu =
    hu + sum_k alpha_k * delta_k`` and ``visibility = max_k alpha_k * min(1, |delta_k| / config.visible_hu)``
    in [0, 1], the maximum over every change (K = 1) or, with ``config.signed``, over the hyperdense
    changes (channel 0) and the hypodense ones (channel 1), where ``alpha_k = sigmoid((1 - r_k) /
    softness_k)`` inside the paintable region (:func:`paintable_region`) and 0 outside it, ``r_k`` the
    ellipsoid's normalised radius (1 on its surface, in the rotated frame of its semi-axes in mm)
    roughened by Gaussian noise of ``config.edge_roughness``. So the centre of a +30 HU change gets about
    +30 HU and visibility 1 (with ``visible_hu`` 15), and a voxel outside every change keeps its HU and
    visibility 0.

    The draws are those of the volumes ``first_volume ..`` of a global batch of ``global_batch``
    (None: B) from ``generator`` (a CPU generator; None: torch's global one), as the crops of
    :class:`fmct.data.MultiCropAugment` are.
    """
    batch = hu.shape[0]
    draws = draw_changes(config, batch if global_batch is None else global_batch, generator)
    draws = ChangeDraws(*(values[first_volume : first_volume + batch] for values in draws))
    hu = hu.float().clone()
    visibility = hu.new_zeros((batch, config.kinds, *hu.shape[2:]))
    shape = torch.tensor(hu.shape[2:])
    painted = draws.active.nonzero().view(-1).tolist()  # about half the batch: the region only for those
    for j, region in zip(painted, paintable_region(hu[painted], spacing_mm, config.air_margin_mm)):
        candidates = region[0].nonzero()
        if len(candidates) == 0:
            continue
        noise = torch.Generator(hu.device).manual_seed(int(draws.noise_seed[j]))
        for k in range(int(draws.count[j])):
            centre = candidates[int(draws.centre[j, k] * len(candidates))].cpu()
            softness = float(draws.softness[j, k])
            reach = int(draws.semi_axes_mm[j, k].max() * (1 + 6 * softness) / spacing_mm) + 1
            low, high = (centre - reach).clamp(min=0), torch.minimum(centre + reach + 1, shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
            offsets_mm = [
                (torch.arange(int(a), int(b), device=hu.device, dtype=torch.float32) - float(c)) * spacing_mm
                for a, b, c in zip(low, high, centre)
            ]
            grid = torch.stack(torch.meshgrid(*offsets_mm, indexing="ij"))  # (3, x, y, z) mm from the centre
            rotation = draws.rotation[j, k].to(hu.device, torch.float32)
            rotated = torch.einsum("ij,j...->i...", rotation, grid)
            semi = draws.semi_axes_mm[j, k].to(hu.device, torch.float32).view(3, 1, 1, 1)
            radius = (rotated / semi).square().sum(0).sqrt()
            radius = radius + config.edge_roughness * torch.randn(
                radius.shape, generator=noise, device=hu.device, dtype=torch.float32
            )
            alpha = torch.sigmoid((1 - radius) / softness) * region[0][box]
            delta = float(draws.delta_hu[j, k])
            hu[j, 0][box] += alpha * delta
            visible = alpha * min(1.0, abs(delta) / config.visible_hu)
            kind = int(config.signed and delta < 0)
            visibility[j, kind][box] = torch.maximum(visibility[j, kind][box], visible)
    return hu, visibility


def change_targets(visibility: torch.Tensor, patch_size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets in [0, 1] from crops' visibility maps (N, K, D, H, W), K kinds of change: per patch the
    most visible change of each kind in it, (N, K, n_patches) in the ViT's patch order, and per crop,
    (N, K)."""
    per_patch = F.max_pool3d(visibility, patch_size).flatten(2)
    return per_patch, visibility.flatten(2).amax(dim=2)


def anomaly_loss(
    patch_logits: torch.Tensor,
    scan_logits: torch.Tensor,
    patch_targets: torch.Tensor,
    scan_targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of the patch logits (N, K, n_patches) and the scan logits (N, K) against
    soft targets of the same shapes in [0, 1]; each the mean over its elements, returned as
    ``(patch_loss, scan_loss)``.

    Hand check: logits 0 give ln 2 = 0.693 whatever the targets; a logit of ln 3 (probability 3/4)
    against a target of 1 gives -ln(3/4) = 0.288.
    """
    patch = F.binary_cross_entropy_with_logits(patch_logits.float(), patch_targets.float())
    scan = F.binary_cross_entropy_with_logits(scan_logits.float(), scan_targets.float())
    return patch, scan
