"""From a scan as read to the canonical volume: RAS, isotropic spacing, a fixed grid centred on the head.

The canonical grid is axis-aligned in the scan's own world frame (RAS, mm): voxel (i, j, k) sits at
``origin + spacing_mm * (i, j, k)`` with i towards the patient's Right, j Anterior, k Superior. Any
source geometry — reversed, oblique, gantry-tilted (a sheared affine) — is handled by one resampling
through the exact voxel-to-voxel mapping, so landmarks keep their world coordinates.

HU windows for the model are applied later, on the training device (``fmct.data``); here HU stay HU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fmct.config import CanonicalConfig
from fmct.errors import ScanError
from fmct.io.volume import Volume

# Spacing (mm) of the coarse copy used to find the head: fine enough for a 5 mm opening, cheap to label.
_MASK_SPACING_MM = 3.0
_GRID_SAMPLE_MODES = {"linear": "bilinear", "nearest": "nearest"}  # grid_sample's "bilinear" is trilinear in 3D
# Source planes averaged per slab in ``_box_average``: a few MB of a 512^2 scan, so the passes stay in cache.
_SLAB_PLANES = 8


def canonical(volume: Volume, config: CanonicalConfig | None = None) -> Volume:
    """Resample ``volume`` onto the canonical grid of ``config`` and return it as int16 HU.

    The grid is ``config.shape`` voxels of ``config.spacing_mm`` (default 128^3 at 1.5 mm, a 192 mm cube),
    centred in x and y on the head and placed in z so that the vertex lies ``vertex_margin_mm`` below the
    top face. The CT table, headrest and air do not steer the centring (see :func:`head_mask`). Voxels
    outside the source field of view are air (``config.air_hu``). The returned affine maps canonical
    voxels to the source's world RAS coordinates in mm.
    """
    config = config or CanonicalConfig()
    centre = head_centre(volume, config)
    shape = np.asarray(config.shape)
    affine = np.diag([config.spacing_mm] * 3 + [1.0])
    affine[:3, 3] = centre - config.spacing_mm * (shape - 1) / 2.0
    hu = resample(volume, affine, tuple(config.shape), config)
    metadata = dict(volume.metadata, store_shape=list(config.shape), store_spacing_mm=[config.spacing_mm] * 3)
    return Volume(hu=hu, affine=affine, metadata=metadata, identity=volume.identity, source=volume.source)


def head_mask(volume: Volume, threshold_hu: float = -300.0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean head mask on a coarse (~3 mm) copy of ``volume``, and that copy's voxel->RAS affine.

    Body is tissue above ``threshold_hu``. A 3D opening (radius ~6 mm) cuts the thin CT table and
    headrest shell away from the head, and the largest connected component is kept: the head.

    Raises:
        ScanError: when almost nothing is air, which no head CT in HU is (a mask, or wrong rescaling).
    """
    step = np.maximum(1, np.round(_MASK_SPACING_MM / volume.spacing_mm).astype(int))
    coarse = np.asarray(volume.hu[:: step[0], :: step[1], :: step[2]])
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] * step
    if np.mean(coarse < -500) < 0.01:
        raise ScanError(
            "not CT in HU: under 1% of voxels are air (< -500 HU); a mask, a label map or another modality?"
        )
    body = coarse > threshold_hu
    radius = np.maximum(1, np.round(6.0 / (volume.spacing_mm * step)).astype(int))
    opened = ndimage.binary_opening(body, structure=_ellipsoid(radius))
    labels, count = ndimage.label(opened)
    if count == 0:
        labels, count = ndimage.label(body)  # a tiny field of view: no opening
    if count == 0:
        return np.zeros_like(body), affine
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes)), affine


def head_centre(volume: Volume, config: CanonicalConfig) -> np.ndarray:
    """World RAS point (mm) at the centre of the canonical cube for ``volume``.

    z: the vertex (highest head voxel) plus ``vertex_margin_mm`` is the top of the cube, so a scan that
    also covers the neck keeps the whole brain in view. x, y: the middle of the head's extent within the
    cube's height (robust 1st-99th percentiles), so shoulders or a nose do not pull the centre.
    """
    mask, affine = head_mask(volume, config.head_threshold_hu)
    points = np.argwhere(mask)
    if len(points) < 8:
        raise ScanError(f"no head found: fewer than 8 voxels above {config.head_threshold_hu:g} HU")
    world = points @ affine[:3, :3].T + affine[:3, 3]
    height_mm = config.spacing_mm * config.shape[2]
    top = world[:, 2].max() + config.vertex_margin_mm
    in_cube = world[world[:, 2] >= top - height_mm]
    low, high = np.percentile(in_cube[:, :2], [1, 99], axis=0)
    return np.array([(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, top - height_mm / 2])


def resample(
    volume: Volume, target_affine: np.ndarray, shape: tuple[int, int, int], config: CanonicalConfig
) -> np.ndarray:
    """Sample ``volume`` at the voxel centres of the grid (``target_affine``, ``shape``) -> int16 HU.

    :func:`sample_on_grid` with ``config``'s interpolation and antialiasing; voxels outside the source
    field of view are air (``config.air_hu``).
    """
    hu = sample_on_grid(
        volume.hu,
        volume.affine,
        target_affine,
        shape,
        config.interpolation,
        config.antialias,
        fill=float(config.air_hu),
    )
    return np.ascontiguousarray(np.clip(np.rint(hu), config.air_hu, np.iinfo(np.int16).max).astype(np.int16))


def sample_on_grid(
    values: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    shape: tuple[int, int, int],
    interpolation: str = "linear",
    antialias: bool = False,
    fill: float = 0.0,
) -> np.ndarray:
    """Sample a volume ``values`` (I, J, K) with voxel -> world (mm) ``source_affine`` at the voxel centres of
    the grid (``target_affine``, ``shape``) -> float32 (``shape``), ``fill`` outside the source.

    One trilinear (or nearest) interpolation through the voxel-to-voxel map ``inv(source_affine) @ target_affine``,
    so any pair of grids (sheared, oblique, reversed) maps exactly. Only the source box that the grid
    touches is converted to float. With ``antialias``, source axes finer than half the target spacing are
    first averaged over whole voxels, so that downsampling thin slices does not alias their noise (the
    averaged grid's affine is shifted to stay exact). When the map neither rotates nor shears (an axial
    scan onto the canonical grid, nearly every one), trilinear interpolation runs as three 1-D passes,
    one per axis, with the same weights: several times faster than a 3-D grid of sample points.
    """
    source_shape = np.array(values.shape)
    target_to_source = np.linalg.inv(source_affine) @ target_affine
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    touched = corners @ target_to_source.T
    low = np.clip(np.floor(touched[:, :3].min(axis=0)).astype(int) - 1, 0, source_shape - 1)
    high = np.clip(np.ceil(touched[:, :3].max(axis=0)).astype(int) + 2, 1, source_shape)
    if np.any(high <= low):
        raise ScanError("the canonical grid does not overlap the scan's field of view")
    box = values[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    factor = np.ones(3, dtype=int)
    if antialias:
        target_spacing = np.linalg.norm(target_affine[:3, :3], axis=0)
        source_spacing = np.linalg.norm(source_affine[:3, :3], axis=0)
        factor = np.floor(target_spacing / source_spacing + 1e-6).astype(int)
        factor = np.where(factor >= 2, factor, 1)
    # Readers give (I, J, K) views of slice-major memory, so the transposed box (K, J, I) is contiguous.
    box_kji = _box_average(box.T, factor[::-1])
    # Target voxel -> index into the (averaged) box: the first averaged voxel is centred at
    # low + (factor - 1) / 2 in source voxel units, and averaged voxels are ``factor`` source voxels wide.
    offset = low + (factor - 1) / 2.0
    to_box = (
        np.diag(np.append(1.0 / factor, 1.0))
        @ np.array([[1, 0, 0, -offset[0]], [0, 1, 0, -offset[1]], [0, 0, 1, -offset[2]], [0, 0, 0, 1.0]])
        @ target_to_source
    )
    mode = _GRID_SAMPLE_MODES.get(interpolation)
    if mode is None:
        raise ValueError(f"interpolation must be one of {', '.join(_GRID_SAMPLE_MODES)}, not {interpolation!r}")
    scale = np.diag(to_box)[:3]
    if mode == "bilinear" and np.abs(to_box[:3, :3] - np.diag(scale)).max() <= 1e-9:  # no rotation, no shear
        sampled = _separable_linear(box_kji - np.float32(fill), scale, to_box[:3, 3], shape)
    else:
        sampled = _grid_sample(box_kji - np.float32(fill), to_box, shape, mode)
    # sampled is indexed (k, j, i) of the target: back to (i, j, k), C-contiguous.
    return np.ascontiguousarray(sampled.T + np.float32(fill))


def _grid_sample(values: np.ndarray, to_box: np.ndarray, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """grid_sample of ``values`` (K, J, I), zero outside it, at box index ``to_box @ (i, j, k, 1)`` for every
    target voxel of ``shape`` -> float32 (k, j, i) of the target. As a (D, H, W) tensor, grid_sample's
    point order (x, y, z) = (W, H, D) is simply (i, j, k)."""
    # affine_grid maps normalised target coordinates ([-1, 1] per axis, align_corners) to normalised
    # source coordinates.
    box_size = np.array(values.shape[::-1], dtype=np.float64)
    normalise = np.diag(np.append(2.0 / np.maximum(box_size - 1, 1), 1.0))
    normalise[:3, 3] = -1.0
    denormalise = np.diag(np.append((np.array(shape, dtype=np.float64) - 1) / 2.0, 1.0))
    denormalise[:3, 3] = (np.array(shape) - 1) / 2.0
    theta = (normalise @ to_box @ denormalise)[:3]
    grid = F.affine_grid(
        torch.from_numpy(theta[None]).float(), size=[1, 1, shape[2], shape[1], shape[0]], align_corners=True
    )
    tensor = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    return F.grid_sample(tensor, grid, mode=mode, padding_mode="zeros", align_corners=True)[0, 0].numpy()


def _separable_linear(
    values: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """Trilinear samples of ``values`` (K, J, I), zero outside it, at box index ``scale * t + offset`` for
    every target voxel t = (i, j, k) of ``shape`` -> float32 (k, j, i) of the target.

    Trilinear weights are a product of one linear weight per axis, so interpolating along K, then J,
    then I gives grid_sample's result (zero padding, align_corners) without a grid of 3-D sample points.
    """
    out = values
    for array_axis, target_axis in enumerate((2, 1, 0)):
        n_source = out.shape[array_axis]
        position = scale[target_axis] * np.arange(shape[target_axis]) + offset[target_axis]
        lower = np.floor(position).astype(np.int64)
        upper_weight = (position - lower).astype(np.float32)
        lower_weight = np.float32(1) - upper_weight
        lower_weight[(lower < 0) | (lower > n_source - 1)] = 0  # a neighbour outside the box adds nothing
        upper_weight[(lower + 1 < 0) | (lower + 1 > n_source - 1)] = 0
        broadcast = [1, 1, 1]
        broadcast[array_axis] = -1
        below = np.take(out, np.clip(lower, 0, n_source - 1), axis=array_axis)
        below *= lower_weight.reshape(broadcast)
        above = np.take(out, np.clip(lower + 1, 0, n_source - 1), axis=array_axis)
        above *= upper_weight.reshape(broadcast)
        below += above
        out = below
    return out


def _box_average(volume: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Float32 mean over non-overlapping blocks of ``factor`` voxels (a trailing partial block is dropped).

    Strided slice sums, outermost memory axis first: each pass reads contiguous runs of memory (about 5x
    faster than avg_pool3d on a CPU core), and the first pass is also the int16 -> float32 conversion.
    The volume goes through in slabs of a few planes along its outermost axis, so that every pass works
    in cache and no float copy of the whole volume is made.
    """
    volume = np.asarray(volume)
    if np.all(factor == 1):
        return volume.astype(np.float32, copy=False)
    outer = int(np.argmax([abs(stride) for stride in volume.strides]))
    planes = int(factor[outer]) * max(1, _SLAB_PLANES // int(factor[outer]))  # whole blocks per slab
    n_outer = volume.shape[outer] // int(factor[outer]) * int(factor[outer])
    slabs = [
        _block_sums(volume[(slice(None),) * outer + (slice(start, min(start + planes, n_outer)),)], factor)
        for start in range(0, n_outer, planes)
    ]
    return np.concatenate(slabs, axis=outer) / np.float32(np.prod(factor))


def _block_sums(volume: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Float32 sums over non-overlapping blocks of ``factor`` voxels, one strided pass per axis."""
    out = volume
    for axis in np.argsort([-abs(stride) for stride in out.strides], kind="stable"):
        f = int(factor[axis])
        n = out.shape[axis] // f * f
        if f == 1 or n == 0:
            continue
        parts = [out[(slice(None),) * axis + (slice(start, n, f),)] for start in range(f)]
        total = parts[0].astype(np.float32)
        for part in parts[1:]:
            total += part
        out = total
    return out.astype(np.float32, copy=False)


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0
