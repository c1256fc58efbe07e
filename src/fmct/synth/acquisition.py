"""From a head in scanner space to the reconstructed CT series: slices, kernel, noise, geometry.

The head is first sampled on a *scanner grid* of 1.5 mm whose axes are those of the series (image
rows, image columns tilted with the gantry, table direction), so that every later step is separable:
slice-thickness averaging along the table is one matrix, pixel interpolation with the kernel's blur or
edge enhancement one matrix per in-plane axis. A 512 x 512 x 35 series costs a few matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID_MM = 1.5  # in-plane spacing of the scanner grid the head is warped onto
MAX_GRID_Z_MM = 2.5  # its spacing along the table: two samples per slab of thick slices, 1.5 mm for thin
AIR_HU = -1000.0


@dataclass(frozen=True)
class Acquisition:
    """How one series is reconstructed. Lengths in mm, angles in degrees, world frame RAS.

    Attributes:
        matrix: pixels per row and column (512 clinically).
        fov_mm: reconstruction field of view; pixel spacing = fov_mm / matrix.
        thickness_mm: slice thickness, also the slice increment (contiguous slices).
        z_first_mm / n_slices: table position of the first slice's centre and the number of slices.
        centre_mm: (x, y) world position of the FOV centre.
        tilt_deg: gantry tilt; the image columns lean by this angle towards +z.
        kernel: "soft" (brain: blur, smooth noise) or "sharp" (bone: edge enhancement, grainy noise).
        kernel_name: the vendor's name for it (ConvolutionKernel).
        noise_hu: HU standard deviation of quantum noise in this series.
        hu_offset: calibration offset added to every HU.
    """

    matrix: int
    fov_mm: float
    thickness_mm: float
    z_first_mm: float
    n_slices: int
    centre_mm: tuple[float, float]
    tilt_deg: float
    kernel: str
    kernel_name: str
    noise_hu: float
    hu_offset: float = 0.0

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.matrix

    @property
    def row_direction(self) -> np.ndarray:
        """World direction of increasing column index I (towards the patient's left, DICOM convention)."""
        return np.array([-1.0, 0.0, 0.0])

    @property
    def column_direction(self) -> np.ndarray:
        """World direction of increasing row index J: posterior, tilted towards +z by the gantry."""
        tilt = np.radians(self.tilt_deg)
        return np.array([0.0, -np.cos(tilt), np.sin(tilt)])

    def affine(self) -> np.ndarray:
        """4x4 RAS voxel (I, J, K) -> world mm of the reconstructed series (sheared when tilted)."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_direction * self.pixel_mm
        affine[:3, 1] = self.column_direction * self.pixel_mm
        affine[:3, 2] = np.array([0.0, 0.0, self.thickness_mm])
        half = (self.matrix - 1) / 2 * self.pixel_mm
        centre = np.array([self.centre_mm[0], self.centre_mm[1], self.z_first_mm])
        affine[:3, 3] = centre - half * (self.row_direction + self.column_direction)
        return affine


@dataclass(frozen=True)
class ScannerGrid:
    """The 1.5 mm grid aligned with an acquisition's axes on which the head is sampled.

    Index (a, b, c) maps to world ``origin + GRID_MM * (a * row + b * column) + z_step_mm * c * z``,
    where the series' pixel (i, j, k) sits at ``a = i * pixel / GRID_MM + pad``,
    ``b = j * pixel / GRID_MM + pad``, ``c = k * thickness / z_step_mm + pad_z``.
    """

    acquisition: Acquisition
    pad: int
    pad_z: int
    z_step_mm: float
    shape: tuple[int, int, int]

    @classmethod
    def for_acquisition(cls, acquisition: Acquisition) -> "ScannerGrid":
        pad = 2
        z_step = float(np.clip(acquisition.thickness_mm / 2, GRID_MM, MAX_GRID_Z_MM))
        pad_z = int(np.ceil(acquisition.thickness_mm / z_step / 2)) + 2
        in_plane = int(np.ceil(acquisition.fov_mm / GRID_MM)) + 2 * pad + 1
        along = int(np.ceil((acquisition.n_slices - 1) * acquisition.thickness_mm / z_step)) + 2 * pad_z + 1
        return cls(acquisition, pad, pad_z, z_step, (in_plane, in_plane, along))

    def axes_to_world(self) -> tuple[np.ndarray, np.ndarray]:
        """``(origin, steps)``: world mm of index (0, 0, 0) and the 3x3 matrix of per-index steps (columns)."""
        acq = self.acquisition
        steps = np.stack(
            [acq.row_direction * GRID_MM, acq.column_direction * GRID_MM, np.array([0.0, 0.0, self.z_step_mm])], axis=1
        )
        origin = acq.affine()[:3, 3] - steps @ np.array([self.pad, self.pad, self.pad_z], dtype=np.float64)
        return origin, steps


def _hat_integral(u: np.ndarray) -> np.ndarray:
    """Integral from -inf to ``u`` of the linear-interpolation kernel (the hat of half-width 1)."""
    u = np.clip(u, -1, 1)
    return np.where(u < 0, 0.5 * (1 + u) ** 2, 1 - 0.5 * (1 - u) ** 2)


def slab_weights(grid: ScannerGrid) -> np.ndarray:
    """(n_slices, grid planes) weights averaging the linearly interpolated grid over each slice's slab."""
    acq = grid.acquisition
    n_slices, n_grid = acq.n_slices, grid.shape[2]
    centres = np.arange(n_slices) * acq.thickness_mm / grid.z_step_mm + grid.pad_z
    half = acq.thickness_mm / grid.z_step_mm / 2
    grid = np.arange(n_grid)
    lo, hi = centres[:, None] - half - grid[None, :], centres[:, None] + half - grid[None, :]
    weights = (_hat_integral(hi) - _hat_integral(lo)) / (hi - lo)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _interpolation(n_out: int, step: float, offset: float, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation at input positions ``offset + step * i``."""
    position = offset + step * np.arange(n_out)
    distance = np.abs(position[:, None] - np.arange(n_in)[None, :])
    return np.clip(1 - distance, 0, None).astype(np.float32)


def kernel_matrix(n: int, kernel: str, pixel_mm: float) -> np.ndarray:
    """(n, n) in-plane filter of a reconstruction kernel along one axis.

    "soft": Gaussian blur of 0.45 mm; "sharp": unsharp masking (edges overshoot, noise grows).
    """
    identity = np.eye(n, dtype=np.float32)
    if kernel == "soft":
        return ndimage.gaussian_filter1d(identity, 0.45 / pixel_mm, axis=0, mode="nearest")
    if kernel == "sharp":
        blurred = ndimage.gaussian_filter1d(identity, 1.0 / pixel_mm, axis=0, mode="nearest")
        return identity + 0.9 * (identity - blurred)
    raise ValueError(f"unknown kernel {kernel!r} (soft or sharp)")


def reconstruct(grid: ScannerGrid, hu_grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The series' HU (float32 (I, J, K) = (matrix, matrix, n_slices)) from the head on the scanner grid.

    Averages each slice's slab, resamples to the pixel grid through the kernel's filter, then adds
    quantum noise with the kernel's texture (white noise at half resolution through the same filter).
    """
    acq = grid.acquisition
    step = acq.pixel_mm / GRID_MM
    interpolate = _interpolation(acq.matrix, step, grid.pad, grid.shape[0])
    kernel = kernel_matrix(acq.matrix, acq.kernel, acq.pixel_mm)
    in_plane = kernel @ interpolate  # (matrix, grid), the same for rows and columns
    slabs = np.tensordot(hu_grid, slab_weights(grid), axes=([2], [1]))
    slices = _filter_planes(slabs, in_plane)

    # Noise: white noise on a coarser grid through the kernel, each row scaled to unit variance. The
    # grain is about 1.4 mm for soft kernels and finer (with edge enhancement) for sharp ones.
    factor = 3 if acq.kernel == "soft" else 2
    coarse = acq.matrix // factor
    upsample = kernel @ _interpolation(acq.matrix, 1.0 / factor, 0.5 / factor - 0.5, coarse)
    upsample /= np.sqrt((upsample**2).sum(axis=1, keepdims=True))
    white = rng.standard_normal((coarse, coarse, acq.n_slices), dtype=np.float32)
    slices += _filter_planes(white, upsample * np.float32(np.sqrt(acq.noise_hu)))
    slices += acq.hu_offset
    return slices


def _filter_planes(planes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix @ planes[:, :, k] @ matrix.T`` for every k, as two large matrix products.

    ``planes`` is (n, n, K), ``matrix`` (m, n); the result is (m, m, K) float32.
    """
    n, _, depth = planes.shape
    m = matrix.shape[0]
    rows = (matrix @ planes.reshape(n, n * depth)).reshape(m, n, depth)  # (I, b, K)
    both = np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(m * depth, n) @ matrix.T  # (I*K, J)
    return both.reshape(m, depth, m).transpose(0, 2, 1)


def reconstruct_bits(grid: ScannerGrid, bits_grid: np.ndarray) -> np.ndarray:
    """Label bits on the series' voxels (uint16 (I, J, K)): OR over each slab, nearest pixel in-plane."""
    acq = grid.acquisition
    weights = slab_weights(grid)
    slabs = np.zeros(bits_grid.shape[:2] + (acq.n_slices,), dtype=bits_grid.dtype)
    for k in range(acq.n_slices):
        touched = np.flatnonzero(weights[k] > 0.02)
        slabs[:, :, k] = np.bitwise_or.reduce(bits_grid[:, :, touched], axis=2)
    nearest = np.clip(
        np.rint(np.arange(acq.matrix) * acq.pixel_mm / GRID_MM + grid.pad).astype(int), 0, grid.shape[0] - 1
    )
    return np.ascontiguousarray(slabs[nearest][:, nearest])


def paint_table(
    grid: ScannerGrid, hu_grid: np.ndarray, back_of_head_y_mm: float, head_z_mm: tuple[float, float]
) -> None:
    """Add the CT table and a curved headrest with its foam pad under the head (in place, HU)."""
    origin, steps = grid.axes_to_world()
    a = np.arange(grid.shape[0])
    b = np.arange(grid.shape[1])
    c = np.arange(grid.shape[2])
    x = origin[0] + steps[0, 0] * a  # world x depends on a only, world y on b only
    y = origin[1] + steps[1, 1] * b
    z = origin[2] + steps[2, 1] * b[None, :] + steps[2, 2] * c[:, None]  # (C, B)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    cradle = back_of_head_y_mm - 4.0 + (xx / 95.0) ** 2 * 45.0
    shell = (yy < cradle) & (yy > cradle - 4.0) & (np.abs(xx) < 85)
    pad = (yy >= cradle) & (yy < cradle + 5.0) & (np.abs(xx) < 80)
    top = back_of_head_y_mm - 34.0
    table = ((yy < top) & (yy > top - 3.0)) | ((yy < top - 12.0) & (yy > top - 15.0))
    core = (yy <= top - 3.0) & (yy >= top - 12.0)
    table &= np.abs(xx) < 230
    core &= np.abs(xx) < 225
    values = np.full(xx.shape, np.nan, dtype=np.float32)
    values[core] = -850.0
    values[table] = 250.0
    values[pad] = -880.0
    values[shell] = 120.0
    in_headrest = (z > head_z_mm[0] - 20) & (z < head_z_mm[1] - 40)  # the cradle stops below the vertex
    painted = ~np.isnan(values)
    is_headrest = shell | pad
    air = hu_grid < -950
    for k in range(grid.shape[2]):
        where = painted & air[:, :, k] & (~is_headrest | in_headrest[k][None, :])
        hu_grid[:, :, k][where] = values[where]
