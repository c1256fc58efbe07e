"""Canonical resampling: world coordinates survive any source geometry; the head, not the table, is centred."""

import numpy as np
import pytest

from fmct.config import CanonicalConfig
from fmct.io.volume import Volume
from fmct.preprocess import canonical, head_centre

HEAD_CENTRE = np.array([8.0, -15.0, 20.0])  # world RAS mm
HEAD_RADII = np.array([70.0, 85.0, 75.0])
BEADS = np.array([[20.0, -10.0, 50.0], [-30.0, 25.0, -10.0], [45.0, -40.0, 10.0]])


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def phantom(axes: np.ndarray, spacing: np.ndarray, shape, shear: float = 0.0, table: bool = False) -> Volume:
    """A soft-tissue ellipsoid head with Gaussian beads (peak 1000 HU above tissue) at known world points.

    ``axes`` columns are the unit directions of i, j, k; ``shear`` tilts the slice stack: the k step gains a
    component of ``shear`` times its length along j (a gantry tilt of atan(shear)).
    """
    columns = axes * spacing
    columns[:, 2] = columns[:, 2] + shear * spacing[2] * axes[:, 1]
    affine = np.eye(4)
    affine[:3, :3] = columns
    centre_index = (np.array(shape) - 1) / 2
    affine[:3, 3] = HEAD_CENTRE - columns @ centre_index
    volume = Volume(hu=np.zeros(shape, np.float32), affine=affine)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = grid @ columns.T + affine[:3, 3]
    inside = (((world - HEAD_CENTRE) / HEAD_RADII) ** 2).sum(-1) < 1
    hu = np.where(inside, 40.0, -1000.0)
    for bead in BEADS:
        hu += 1000.0 * np.exp(-((world - bead) ** 2).sum(-1) / (2 * 3.0**2))
    if table:  # a dense plate 10 mm below the back of the head, longer than the head
        y = world[..., 1]
        hu = np.where((y < HEAD_CENTRE[1] - HEAD_RADII[1] - 10) & (y > HEAD_CENTRE[1] - HEAD_RADII[1] - 16), 300.0, hu)
    volume.hu = hu.astype(np.float32)
    return volume


def bead_positions(volume: Volume) -> np.ndarray:
    """Intensity-weighted centroids (world mm) of the beads, each within 8 mm of its true place."""
    hu = volume.hu.astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
    world = grid @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    found = []
    for bead in BEADS:
        near = (((world - bead) ** 2).sum(-1) < 8.0**2) & (hu > 140)
        weight = hu[near] - 40.0
        found.append((world[near] * weight[:, None]).sum(0) / weight.sum())
    return np.array(found)


GEOMETRIES = {
    "axial": dict(axes=np.eye(3), spacing=np.array([1.0, 1.0, 2.0])),
    "reversed": dict(axes=np.diag([1.0, -1.0, -1.0]), spacing=np.array([1.0, 1.0, 2.0])),
    "oblique20": dict(axes=rotation(0, 20.0), spacing=np.array([1.0, 1.0, 2.0])),
    "tilted15": dict(axes=np.eye(3), spacing=np.array([1.0, 1.0, 2.0]), shear=np.tan(np.radians(15.0))),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_landmarks_keep_world_coordinates(name):
    geometry = GEOMETRIES[name]
    source = phantom(geometry["axes"], geometry["spacing"], (200, 210, 96), geometry.get("shear", 0.0))
    result = canonical(source, CanonicalConfig())
    assert result.hu.dtype == np.int16 and result.shape == (128, 128, 128)
    assert np.allclose(result.spacing_mm, 1.5)
    assert np.allclose(result.affine[:3, :3], np.diag([1.5] * 3))  # RAS, axis-aligned
    error_mm = np.linalg.norm(bead_positions(result) - BEADS, axis=1)
    assert error_mm.max() < 0.5, error_mm


def test_hu_values_and_outside_field_of_view():
    source = phantom(np.eye(3), np.array([1.0, 1.0, 2.0]), (200, 210, 96))
    result = canonical(source, CanonicalConfig())
    world = result.world(np.argwhere(np.ones(result.shape, bool))).reshape(*result.shape, 3)
    deep = (((world - HEAD_CENTRE) / (HEAD_RADII - 10)) ** 2).sum(-1) < 1
    far_from_beads = np.min([np.linalg.norm(world - b, axis=-1) for b in BEADS], axis=0) > 15
    assert np.abs(result.hu[deep & far_from_beads] - 40).max() <= 1
    # The source covers 192 mm in z around the head centre; the cube reaches beyond it: air there.
    source_box = source.voxel(world.reshape(-1, 3)).reshape(*result.shape, 3)
    outside = np.any((source_box < -1) | (source_box > np.array(source.shape)), axis=-1)
    assert outside.any() and np.all(result.hu[outside] == -1024)


def test_head_not_table_steers_the_centre():
    config = CanonicalConfig()
    source = phantom(np.eye(3), np.array([1.0, 1.0, 2.0]), (200, 220, 96), table=True)
    centre = head_centre(source, config)
    assert abs(centre[0] - HEAD_CENTRE[0]) < 3 and abs(centre[1] - HEAD_CENTRE[1]) < 3
    vertex_z = HEAD_CENTRE[2] + HEAD_RADII[2]
    expected_z = vertex_z + config.vertex_margin_mm - config.spacing_mm * config.shape[2] / 2
    assert abs(centre[2] - expected_z) < 3.5


def test_antialias_averages_noise_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = -50
    hu = (40 + 20 * rng.standard_normal((200, 200, 200))).astype(np.float32)
    hu[:, :, 190:] = -1000  # air above the "head" so the vertex is found
    noisy = Volume(hu=hu, affine=affine)
    config = CanonicalConfig(shape=(32, 32, 32))
    smooth = canonical(noisy, config).hu[8:24, 8:24, 4:20].astype(float)
    aliased = canonical(noisy, CanonicalConfig(shape=(32, 32, 32), antialias=False)).hu[8:24, 8:24, 4:20].astype(float)
    assert abs(smooth.mean() - 40) < 0.5
    assert smooth.std() < 20 / 3 * 1.3  # a 3x3x3 average divides the noise std by about sqrt(27)
    assert aliased.std() > 2 * smooth.std()


def test_nearest_interpolation_only_copies_source_values():
    source = phantom(np.eye(3), np.array([1.0, 1.0, 2.0]), (200, 210, 96))
    source.hu = np.rint(source.hu)
    result = canonical(source, CanonicalConfig(interpolation="nearest", antialias=False))
    assert set(np.unique(result.hu)) <= set(np.unique(source.hu).astype(int)) | {-1024}
