"""Multi-crop augmentation of int16 HU batches on the training device (DINO/iBOT views).

From a batch of canonical volumes (B, 1, X, Y, Z) int16 HU, :class:`MultiCropAugment` makes
``n_global`` large and ``n_local`` small random views per volume:

1. geometry, one ``F.affine_grid`` + ``F.grid_sample`` per crop set: a random box (isotropic by
   default, so anatomy keeps its proportions) resized to the crop size, a random flip per axis and a
   small random rotation about the box centre, sampled trilinearly from a float copy of the HU;
2. on the single HU channel: Gaussian blur (``blur_prob``) and Gaussian noise in HU;
3. HU windows to channels: channel c is ``clip(hu, level - width/2, level + width/2)`` mapped
   linearly to [0, 1], with the level and width of each crop jittered;
4. gamma on the [0, 1] channels.

Crops are returned crop-major, as DINOv2 does: rows ``0..B-1`` are crop 0 of every volume, rows
``B..2B-1`` crop 1, and so on. Every random draw comes from one CPU ``torch.Generator`` (the device's
noise generators are seeded from it), so a seed fixes the output on a given device.

Data-parallel training: each rank holds a slice of the global batch. The draws are made for the whole
global batch (``global_batch`` volumes, from a generator that is the same on every rank) and each rank
keeps the rows of its own volumes (``first_volume`` on): a volume gets the same crops whether the
global batch is split over 1 or 64 ranks. The parameters are a few numbers per crop, so drawing them
for the global batch costs microseconds; the crops themselves are computed for the rank's volumes only.

Flips: only left-right (axis X) is on by default. Head CT is stored in a canonical RAS orientation, so
up-down and front-back flips would show the model anatomy it never meets; the brain is close to
left-right symmetric, so that flip is a plausible view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from fmct.errors import ConfigError, InputError
from fmct.models.windows import DEFAULT_WINDOWS, apply_windows


def _to_device(values: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    # Random parameters are drawn on the CPU. A plain copy from pageable memory waits for the GPU to
    # drain; a copy from pinned memory is queued, so the CPU keeps launching kernels ahead of the GPU.
    values = values.to(dtype) if dtype is not None else values
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


@dataclass
class AugmentConfig:
    """Multi-crop and intensity augmentation. Sizes in output voxels, scales as volume fractions, HU."""

    n_global: int = 2
    global_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)  # crop volume as a fraction of the input volume
    n_local: int = 8
    local_size: int = 48
    local_scale: tuple[float, float] = (0.05, 0.4)
    # Ratio of each box side to the cube root of the box volume; (1, 1) keeps crops cubic, so every
    # crop has the same spacing along x, y and z and anatomy is not stretched.
    aspect_range: tuple[float, float] = (1.0, 1.0)
    flip_prob: tuple[float, float, float] = (0.5, 0.0, 0.0)  # per axis (x left-right, y, z)
    rotation_deg: float = 10.0  # largest angle of the rotation about a random axis
    windows: list[tuple[float, float]] = field(default_factory=lambda: list(DEFAULT_WINDOWS))
    intensity_prob: float = 0.8  # share of crops that get window jitter, noise and gamma
    window_level_jitter_hu: float = 5.0  # level moves by up to this many HU
    window_width_jitter: float = 0.1  # width scales by a factor in [1 - j, 1 + j]
    noise_std_hu: float = 5.0  # noise std drawn per crop in [0, noise_std_hu] HU
    gamma_range: tuple[float, float] = (0.8, 1.25)  # drawn log-uniformly per crop
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # Gaussian sigma in output voxels of the crop

    def __post_init__(self) -> None:
        checks = [
            (self.n_global >= 1 and self.n_local >= 0, "n_global must be >= 1 and n_local >= 0"),
            (self.global_size >= 1 and self.local_size >= 1, "crop sizes must be >= 1 voxel"),
            (
                all(0 < lo <= hi <= 1 for lo, hi in (self.global_scale, self.local_scale)),
                "global_scale and local_scale must be (low, high) with 0 < low <= high <= 1",
            ),
            (0 < self.aspect_range[0] <= 1 <= self.aspect_range[1], "aspect_range must contain 1"),
            (
                len(self.flip_prob) == 3 and all(0 <= p <= 1 for p in self.flip_prob),
                f"flip_prob {list(self.flip_prob)}: three probabilities in [0, 1] (x, y, z)",
            ),
            (
                len(self.windows) >= 1 and all(width > 0 for _, width in self.windows),
                "windows must be a non-empty list of (level, width) with width > 0 HU",
            ),
            (0 <= self.window_width_jitter < 1, "window_width_jitter must lie in [0, 1)"),
            (0 < self.gamma_range[0] <= self.gamma_range[1], "gamma_range must be (low, high), 0 < low <= high"),
            (0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur_sigma must be (low, high), 0 < low <= high"),
            (all(0 <= p <= 1 for p in (self.intensity_prob, self.blur_prob)), "probabilities must lie in [0, 1]"),
            (
                self.rotation_deg >= 0 and self.noise_std_hu >= 0 and self.window_level_jitter_hu >= 0,
                "rotation_deg, noise_std_hu and window_level_jitter_hu must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.flip_prob = tuple(float(p) for p in self.flip_prob)


@dataclass
class CropBoxes:
    """Where the crops of one crop set came from, in input voxel units; row k is crop k (crop-major).

    ``centre`` (N, 3): box centre in voxel index coordinates of the input (voxel i's centre is at i).
    ``size`` (N, 3): box side lengths in input voxels along the crop's own axes.
    ``flip`` (N, 3) bool: crop axis mirrored. ``rotation`` (N, 3, 3): maps crop axes to input axes.
    Output voxel o (per axis, of S) sits at ``centre + rotation @ (flip_sign * ((o + 0.5) / S - 0.5) * size)``.
    """

    centre: torch.Tensor
    size: torch.Tensor
    flip: torch.Tensor
    rotation: torch.Tensor

    def select(self, rows: torch.Tensor) -> "CropBoxes":
        """The boxes of ``rows`` (int64 indices), in that order."""
        return CropBoxes(self.centre[rows], self.size[rows], self.flip[rows], self.rotation[rows])


def crop_major_rows(n_crops: int, global_batch: int, first_volume: int, batch: int) -> torch.Tensor:
    """Rows of the crops of volumes ``first_volume .. first_volume + batch - 1`` in the crop-major layout
    of a global batch of ``global_batch`` volumes (row ``c * global_batch + v`` is crop c of volume v).

    Returned in the rank's own crop-major order (crop 0 of its volumes first), int64 (n_crops * batch,).
    E.g. 2 crops, global batch 4, volumes 2..3: rows [2, 3, 6, 7].
    """
    if not (0 <= first_volume and batch >= 0 and first_volume + batch <= global_batch):
        raise ValueError(
            f"volumes {first_volume}..{first_volume + batch - 1} are not in a global batch of {global_batch}"
        )
    volumes = torch.arange(first_volume, first_volume + batch)
    return (torch.arange(n_crops).unsqueeze(1) * global_batch + volumes).reshape(-1)


def _random_rotations(n: int, max_deg: float, generator: torch.Generator) -> torch.Tensor:
    # Axis uniform on the sphere, angle uniform in [-max, max]: Rodrigues' formula.
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    zero = torch.zeros(n, dtype=torch.float64)
    x, y, z = axis.unbind(1)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(n, 3, 3)
    sin, cos = angle.sin().view(n, 1, 1), angle.cos().view(n, 1, 1)
    return torch.eye(3, dtype=torch.float64) + sin * cross + (1 - cos) * (cross @ cross)


def sample_boxes(
    n_crops: int,
    batch: int,
    in_shape: Sequence[int],
    scale_range: tuple[float, float],
    config: AugmentConfig,
    generator: torch.Generator,
) -> CropBoxes:
    """Random crop boxes for ``n_crops`` crops of each of ``batch`` volumes of shape ``in_shape`` (X, Y, Z).

    A box's volume is a fraction of the input volume drawn uniformly in ``scale_range``; its sides
    follow ``config.aspect_range`` and are clipped to the input extent; its centre is drawn so the
    unrotated box lies inside the input. Flips and rotations follow ``config``.
    """
    n = n_crops * batch
    extent = torch.tensor([float(s) for s in in_shape], dtype=torch.float64)
    low, high = scale_range
    scale = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
    log_aspect = torch.empty(n, 3, dtype=torch.float64).uniform_(
        math.log(config.aspect_range[0]), math.log(config.aspect_range[1]), generator=generator
    )
    # Centred log factors multiply to 1, so the drawn volume fraction is kept (before clipping).
    shape_factor = (log_aspect - log_aspect.mean(dim=1, keepdim=True)).exp()
    size = ((scale * extent.prod()) ** (1 / 3)).unsqueeze(1) * shape_factor
    size = torch.minimum(size, extent)
    offset = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    centre = size / 2 + offset * (extent - size) - 0.5
    flip = torch.rand(n, 3, generator=generator, dtype=torch.float64) < torch.tensor(config.flip_prob)
    rotation = _random_rotations(n, config.rotation_deg, generator)
    return CropBoxes(centre=centre, size=size, flip=flip, rotation=rotation)


def _affine_theta(boxes: CropBoxes, in_shape: Sequence[int]) -> torch.Tensor:
    # affine_grid maps output coordinates u in [-1, 1] to input coordinates v in [-1, 1]
    # (align_corners=False: v = (2 * index + 1) / extent - 1). With the box at input index
    # centre + rotation @ (flip_sign * u * size / 2), v = A u + t where A = diag(1 / extent) R diag(±size).
    extent = torch.tensor([float(s) for s in in_shape], dtype=torch.float64)
    signed_size = boxes.size * (1 - 2 * boxes.flip.double())
    matrix = boxes.rotation * signed_size.unsqueeze(1) / extent.view(1, 3, 1)
    translation = (2 * boxes.centre + 1) / extent - 1
    # Our axes are (X, Y, Z) = tensor dims (D, H, W); grid coordinates run the other way (W, H, D).
    matrix = matrix.flip(1).flip(2)
    translation = translation.flip(1)
    return torch.cat([matrix, translation.unsqueeze(2)], dim=2).float()


def sample_crops(hu: torch.Tensor, boxes: CropBoxes, size: int) -> torch.Tensor:
    """Resample crops of ``hu`` (B, K, X, Y, Z) float (HU, or K maps on the same grid) along ``boxes``
    (crop-major, N = n * B rows).

    Returns (N, K, size, size, size) float, trilinear, values beyond the input edge repeating the
    edge (air, for a canonical head volume). One ``affine_grid`` and one ``grid_sample`` for all crops.
    """
    batch, channels = hu.shape[:2]
    n = boxes.centre.shape[0] // batch
    if n == 0:
        return hu.new_zeros((0, channels, size, size, size))
    if _whole_volumes(boxes, hu.shape[2:], size):
        # Each output voxel centre falls on an input voxel centre: the crop is the volume, mirrored.
        return torch.stack(
            [hu[row % batch].flip([1 + axis for axis in range(3) if boxes.flip[row, axis]]) for row in range(n * batch)]
        )
    theta = _affine_theta(boxes, hu.shape[2:])
    # Order the thetas volume-major so each volume's n crops stack along the first spatial axis of one
    # grid: grid_sample then reads every volume once, without copying it n times.
    theta = _to_device(theta.view(n, batch, 3, 4).transpose(0, 1).reshape(batch * n, 3, 4), hu.device)
    grid = F.affine_grid(theta, [batch * n, 1, size, size, size], align_corners=False)
    grid = grid.view(batch, n * size, size, size, 3)
    crops = F.grid_sample(hu, grid, mode="bilinear", padding_mode="border", align_corners=False)
    crops = crops.view(batch, channels, n, size, size, size).permute(2, 0, 1, 3, 4, 5)
    return crops.reshape(n * batch, channels, size, size, size)


def _whole_volumes(boxes: CropBoxes, in_shape: Sequence[int], size: int) -> bool:
    # True when every box is the whole input, unrotated, sampled at the input's own grid. The tolerance
    # (1e-6 voxel) absorbs the float64 rounding of a drawn box (64^3 -> cube root -> 63.99999999...); a
    # sample that far from a voxel centre differs from it by less than 1e-3 HU at a 1000 HU edge.
    extent = torch.tensor([float(s) for s in in_shape], dtype=torch.float64)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a - b).abs() < 1e-6).all())

    return (
        bool((extent == size).all())
        and close(boxes.size, extent.expand_as(boxes.size))
        and close(boxes.centre, ((extent - 1) / 2).expand_as(boxes.centre))
        and close(boxes.rotation, torch.eye(3, dtype=boxes.rotation.dtype).expand_as(boxes.rotation))
    )


def _gaussian_blur(hu: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    # Separable blur with a different sigma (voxels, a CPU tensor) per crop, the kernel cut at ``radius``
    # voxels: crops become the channels of one grouped convolution per axis. Replicate padding keeps the
    # edges from darkening.
    n, _, d, h, w = hu.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(n, 1)) ** 2)
    kernel = _to_device(kernel / kernel.sum(dim=1, keepdim=True), hu.device, hu.dtype)
    size = 2 * radius + 1
    x = F.pad(hu.view(1, n, d, h, w), [radius] * 6, mode="replicate")
    x = F.conv3d(x, kernel.view(n, 1, size, 1, 1), groups=n)
    x = F.conv3d(x, kernel.view(n, 1, 1, size, 1), groups=n)
    x = F.conv3d(x, kernel.view(n, 1, 1, 1, size), groups=n)
    return x.view(n, 1, d, h, w)


class MultiCropAugment:
    """Global and local crops of an int16 HU batch, augmented on the batch's device.

    ``augment(hu, generator)`` with ``hu`` (B, 1, X, Y, Z) HU (int16 from the loader, any device)
    returns ``(global_crops, local_crops)``: float32 (n_global*B, C, g, g, g) and
    (n_local*B, C, l, l, l) in [0, 1], crop-major, C = number of windows. ``maps`` (B, K, X, Y, Z) on
    the same grid as ``hu`` (e.g. where a pretext changed the volume) are resampled along the global
    crops' boxes, trilinear and without intensity changes, and returned next: (n_global*B, K, g, g, g).
    With ``return_boxes=True`` the two :class:`CropBoxes` come last. ``generator`` is a CPU
    ``torch.Generator`` (None: torch's global one); :func:`fmct.data.dataset.batch_generator` gives one
    that makes resumed runs repeat their crops.
    Runs without autograd and outside autocast (HU need fp32: bf16 steps are 4 HU at 1000 HU).
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config if config is not None else AugmentConfig()

    @torch.no_grad()
    def __call__(
        self,
        hu: torch.Tensor,
        generator: torch.Generator | None = None,
        return_boxes: bool = False,
        first_volume: int = 0,
        global_batch: int | None = None,
        maps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Crops of ``hu``, the volumes ``first_volume ..`` of a global batch of ``global_batch`` (None: B).

        The random parameters are drawn for all ``global_batch`` volumes from ``generator`` and the rows
        of this batch's volumes are kept (:func:`crop_major_rows`), so that a rank's crops are those its
        volumes get in a single process holding the whole global batch.
        """
        if hu.dim() != 5 or hu.shape[1] != 1:
            raise InputError(f"expected an HU batch (B, 1, X, Y, Z), got shape {list(hu.shape)}")
        config = self.config
        batch = hu.shape[0]
        global_batch = batch if global_batch is None else global_batch
        with torch.autocast(hu.device.type, enabled=False):
            hu_float = hu.float()
            crop_sets = [
                (config.n_global, config.global_size, config.global_scale),
                (config.n_local, config.local_size, config.local_scale),
            ]
            outputs, all_boxes = [], []
            for n_crops, size, scale_range in crop_sets:
                rows = crop_major_rows(n_crops, global_batch, first_volume, batch)
                boxes = sample_boxes(n_crops, global_batch, hu.shape[2:], scale_range, config, generator).select(rows)
                crops = sample_crops(hu_float, boxes, size)
                outputs.append(self._intensity(crops, generator, n_crops, first_volume, global_batch))
                all_boxes.append(boxes)
            if maps is not None:
                outputs.append(sample_crops(maps.float(), all_boxes[0], config.global_size))
        return (*outputs, *all_boxes) if return_boxes else tuple(outputs)

    def _intensity(
        self, hu: torch.Tensor, generator: torch.Generator, n_crops: int, first_volume: int, global_batch: int
    ) -> torch.Tensor:
        # hu (N, 1, S, S, S) float HU: n_crops crops of each of this batch's volumes, crop-major ->
        # (N, C, S, S, S) in [0, 1]. All parameters are drawn on the CPU for the global batch, in a
        # fixed order whatever the probabilities (so changing one setting leaves the other draws), and
        # this batch's rows are kept.
        config = self.config
        n = hu.shape[0]
        batch = n // n_crops if n_crops else 0
        rows = crop_major_rows(n_crops, global_batch, first_volume, batch)
        n_drawn = n_crops * global_batch
        n_windows = len(config.windows)

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(n_drawn, *shape, generator=generator, dtype=torch.float64)[rows]

        blurred = uniform() < config.blur_prob
        sigma = config.blur_sigma[0] + (config.blur_sigma[1] - config.blur_sigma[0]) * uniform()
        intensity = (uniform() < config.intensity_prob).double()
        noise_std = config.noise_std_hu * uniform() * intensity
        table = torch.tensor(config.windows, dtype=torch.float64)
        level = table[:, 0] + (2 * uniform(n_windows) - 1) * config.window_level_jitter_hu * intensity.view(n, 1)
        width = table[:, 1] * (1 + (2 * uniform(n_windows) - 1) * config.window_width_jitter * intensity.view(n, 1))
        log_gamma = (
            math.log(config.gamma_range[0])
            + (math.log(config.gamma_range[1]) - math.log(config.gamma_range[0])) * uniform()
        )
        gamma = (log_gamma * intensity).exp()
        # One noise seed per volume of the global batch: a volume's noise does not depend on its batch.
        noise_seeds = torch.randint(0, 2**62, (global_batch,), generator=generator)

        device, dtype = hu.device, hu.dtype
        if blurred.any():
            index = _to_device(blurred.nonzero().view(-1), device)
            # The kernel radius of the largest sigma the config allows, not the batch's: a crop's blur
            # is then the same whichever crops share its batch.
            hu[index] = _gaussian_blur(hu[index], sigma[blurred], radius=max(1, math.ceil(3 * config.blur_sigma[1])))
        if bool((noise_std > 0).any()):
            # Volume-major, so that each volume's noise is one contiguous draw; added crop-major.
            noise = torch.empty((batch, n_crops, *hu.shape[1:]), device=device, dtype=dtype)
            for j in range(batch):
                noise[j].normal_(generator=torch.Generator(device).manual_seed(int(noise_seeds[first_volume + j])))
            std = _to_device(noise_std, device, dtype).view(n_crops, batch, 1, 1, 1, 1)
            hu.view(n_crops, batch, *hu.shape[1:]).addcmul_(noise.transpose(0, 1), std)
        channels = apply_windows(hu, _to_device(level, device, dtype), _to_device(width, device, dtype))
        if bool((gamma != 1).any()):
            channels.pow_(_to_device(gamma, device, dtype).view(n, 1, 1, 1, 1))
        return channels
