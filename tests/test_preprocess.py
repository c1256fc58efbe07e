"""Canonical resampling: world coordinates survive any source geometry; the head, not the table, is centred."""

import numpy as np
import pytest

from fmct.config import CanonicalConfig
from fmct.io.volume import Volume
from fmct.preprocess import canonical, head_centre
from phantoms import BEADS, HEAD_CENTRE, HEAD_RADII, bead_positions, phantom, rotation

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


def test_a_mask_is_not_taken_for_a_ct():
    from fmct.errors import ScanError

    mask = Volume(hu=np.zeros((64, 64, 40), np.float32), affine=np.diag([3.0, 3.0, 5.0, 1.0]))
    mask.hu[20:40, 20:40, 10:30] = 1
    with pytest.raises(ScanError, match="not CT in HU"):
        canonical(mask)


def test_axis_aligned_sampling_in_three_1d_passes_equals_grid_sample():
    """The separable path gives grid_sample's trilinear values: inside, at the edges and outside the box."""
    from fmct.preprocess import _grid_sample, _separable_linear

    rng = np.random.default_rng(0)
    values = rng.normal(0, 100, (30, 40, 50)).astype(np.float32)  # (K, J, I)
    to_box = np.diag([0.7, -1.3, 1.9, 1.0])  # j reversed; targets run past every face of the box
    to_box[:3, 3] = [-2.5, 45.2, -3.3]
    shape = (80, 40, 20)
    separable = _separable_linear(values, np.diag(to_box)[:3], to_box[:3, 3], shape)
    reference = _grid_sample(values, to_box, shape, "bilinear")
    assert separable.shape == reference.shape == shape[::-1]
    assert (reference == 0).mean() > 0.2 and np.abs(reference).max() > 200  # some targets fall outside
    assert np.abs(separable - reference).max() < 0.01  # HU, against values of std 100


def test_box_average_in_slabs_equals_the_whole_volume_mean():
    from fmct.preprocess import _box_average

    rng = np.random.default_rng(1)
    volume = rng.integers(-1024, 2000, (37, 20, 22)).astype(np.int16)  # 37 planes: slabs and a partial block
    factor = np.array([3, 2, 2])
    expected = volume[:36, :20, :22].reshape(12, 3, 10, 2, 11, 2).astype(np.float64).mean(axis=(1, 3, 5))
    assert np.allclose(_box_average(volume, factor), expected, atol=1e-3)
    assert np.allclose(_box_average(volume.T, factor[::-1]), expected.T, atol=1e-3)  # any memory order
