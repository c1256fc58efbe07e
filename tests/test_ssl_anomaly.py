"""The synthetic-anomaly pretext (fmct.ssl.anomaly): where changes may go, what they add, the targets
and loss, and the crops that carry a map along."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmct.config import load_config
from fmct.data import MultiCropAugment
from fmct.data.augment import AugmentConfig, _affine_theta, sample_boxes, sample_crops
from fmct.errors import ConfigError
from fmct.models.windows import window_channels
from fmct.ssl.anomaly import anomaly_loss, change_targets, paint_changes, paintable_region
from fmct.ssl.config import AnomalyConfig, PretrainConfig

SPACING_MM = 3.0


def sphere_head(size: int = 32) -> torch.Tensor:
    """(1, 1, size^3) HU: air outside radius 14 voxels, scalp 40 HU from 12 to 14, skull 1000 HU from 10
    to 12, brain 35 HU inside radius 10 (voxel distances from the centre of the grid)."""
    centre = (size - 1) / 2
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) - centre,) * 3, indexing="ij")
    radius = torch.sqrt(sum(a**2 for a in axes))
    hu = torch.full((size,) * 3, -1000.0)
    hu[radius < 14] = 40.0
    hu[radius < 12] = 1000.0
    hu[radius < 10] = 35.0
    return hu[None, None]


def one_sphere(**overrides) -> AnomalyConfig:
    """Every volume gets exactly one sphere of 6 mm radius, +30 HU, with a sharp, smooth edge."""
    settings = dict(
        probability=1.0,
        max_changes=1,
        semi_axis_mm=(6.0, 6.0),
        delta_hu=(30.0, 30.0),
        hyperdense_share=1.0,
        edge_softness=(0.05, 0.05),
        edge_roughness=0.0,
    )
    return AnomalyConfig(**{**settings, **overrides})


def test_changes_go_only_into_soft_tissue_inside_the_head():
    hu = sphere_head()
    region = paintable_region(hu, SPACING_MM, air_margin_mm=9.0)[0, 0]
    centre = (hu.shape[-1] - 1) / 2
    axes = torch.meshgrid(*(torch.arange(32, dtype=torch.float32) - centre,) * 3, indexing="ij")
    radius = torch.sqrt(sum(a**2 for a in axes))
    # The brain, less its outer voxel shell whose 3x3x3 neighbourhood reaches the skull, is paintable...
    assert region[radius < 8.2].all()
    # ...and nothing else: not the scalp (soft tissue, but within 9 mm = 3 voxels of air), not the skull.
    assert not region[radius >= 10].any()
    # A 1 mm grid with the same margin keeps 9 voxels from air: the scalp, 2 voxels thick, stays out.
    assert not paintable_region(hu, 1.0, air_margin_mm=9.0)[0, 0][radius >= 10].any()


def test_a_change_adds_its_offset_inside_its_ellipsoid_and_nothing_outside():
    hu = sphere_head().repeat(3, 1, 1, 1, 1)
    changed, visibility = paint_changes(hu, SPACING_MM, one_sphere(), torch.Generator().manual_seed(0))
    added = changed - hu
    for j in range(3):
        peak = torch.nonzero(added[j, 0] == added[j, 0].max())[0]  # the centre: alpha falls off around it
        # At the centre the offset is 30 x sigmoid(1 / 0.05) = 30 (to 1e-7) and fully visible (30 >= 15 HU).
        assert added[j, 0][tuple(peak)].item() == pytest.approx(30.0, abs=1e-4)
        assert visibility[j, 0][tuple(peak)].item() == pytest.approx(1.0, abs=1e-6)
        # Voxels closer than the 6 mm radius (2 voxels; at most sqrt(3) away on this grid) get at least
        # 30 x sigmoid((1 - sqrt(3) / 2) / 0.05) = 28 HU, those on the surface 15, those beyond it 2.6 or less:
        # the voxels above 20 HU are the sphere's, within the paintable region.
        axes = torch.meshgrid(*(torch.arange(32.0) - peak[d] for d in range(3)), indexing="ij")
        inside = sum(a**2 for a in axes) < 4
        region = paintable_region(hu[j : j + 1], SPACING_MM, 9.0)[0, 0]
        assert torch.equal(added[j, 0] > 20, inside & region)
    # Nothing changes outside the paintable region; inside, visibility is alpha (30 HU >= 15 HU: fully
    # visible) = added / 30, to the float32 rounding of 35 + 30 alpha (4e-6 HU).
    region = paintable_region(hu, SPACING_MM, 9.0)
    assert (added[~region] == 0).all() and (visibility[~region] == 0).all()
    assert torch.allclose(visibility, added / 30, atol=1e-6)


def test_probability_zero_leaves_the_batch_as_it_was_and_hypodense_changes_remove_density():
    hu = sphere_head().repeat(2, 1, 1, 1, 1)
    changed, visibility = paint_changes(hu, SPACING_MM, one_sphere(probability=0.0), torch.Generator())
    assert torch.equal(changed, hu) and not visibility.any()
    changed, visibility = paint_changes(hu, SPACING_MM, one_sphere(hyperdense_share=0.0), torch.Generator())
    assert (changed - hu).min().item() == pytest.approx(-30.0, abs=1e-4) and (changed - hu).max() <= 0


def test_signed_changes_map_hyperdense_and_hypodense_apart_and_paint_the_same_volumes():
    hu = sphere_head().repeat(2, 1, 1, 1, 1)
    for share, kind in ((1.0, 0), (0.0, 1)):  # all hyperdense: channel 0; all hypodense: channel 1
        config = one_sphere(hyperdense_share=share)
        changed, visibility = paint_changes(hu, SPACING_MM, config, torch.Generator().manual_seed(5))
        signed_changed, signed = paint_changes(
            hu, SPACING_MM, one_sphere(hyperdense_share=share, signed=True), torch.Generator().manual_seed(5)
        )
        # The same draws paint the same HU; the one map of any change becomes the channel of its sign.
        assert visibility.shape == (2, 1, 32, 32, 32) and signed.shape == (2, 2, 32, 32, 32)
        assert torch.equal(signed_changed, changed)
        assert torch.equal(signed[:, kind], visibility[:, 0]) and not signed[:, 1 - kind].any()


def test_a_rank_paints_its_volumes_as_one_process_holding_the_global_batch_would():
    config = AnomalyConfig(probability=1.0, edge_roughness=0.15)
    hu = sphere_head().repeat(4, 1, 1, 1, 1) + torch.arange(4.0).view(4, 1, 1, 1, 1)
    whole = paint_changes(hu, SPACING_MM, config, torch.Generator().manual_seed(3))
    second_half = paint_changes(hu[2:], SPACING_MM, config, torch.Generator().manual_seed(3), 2, 4)
    for all_rows, rank_rows in zip(whole, second_half):
        assert torch.equal(all_rows[2:], rank_rows)


def test_targets_are_the_most_visible_change_per_patch_and_per_crop():
    visibility = torch.zeros(2, 2, 8, 8, 8)  # two kinds of change: hyperdense, hypodense
    visibility[0, 0, 5, 1, 6] = 0.7  # patch (1, 0, 1) of a 2^3 grid of 4^3 patches: index 1*4 + 0*2 + 1 = 5
    visibility[0, 0, 4, 0, 4] = 0.2  # the same patch, less visible
    visibility[1, 1, 0, 0, 0] = 0.4  # a hypodense change in patch 0 of the second crop
    per_patch, per_crop = change_targets(visibility, (4, 4, 4))
    expected = torch.zeros(2, 2, 8)
    expected[0, 0, 5], expected[1, 1, 0] = 0.7, 0.4
    assert torch.equal(per_patch, expected) and torch.equal(per_crop, torch.tensor([[0.7, 0.0], [0.0, 0.4]]))


def test_anomaly_loss_hand_examples():
    patch, scan = anomaly_loss(
        torch.zeros(2, 1, 8), torch.zeros(2, 1), torch.rand(2, 1, 8), torch.tensor([[1.0], [0.0]])
    )
    assert patch.item() == pytest.approx(math.log(2), abs=1e-6) and scan.item() == pytest.approx(math.log(2), abs=1e-6)
    _, scan = anomaly_loss(torch.zeros(1, 1, 1), torch.tensor([[math.log(3)]]), torch.zeros(1, 1, 1), torch.ones(1, 1))
    assert scan.item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # Two kinds: the mean over both, here (-ln(3/4) + -ln(1/4)) / 2 for a logit ln 3 against targets 1 and 0.
    _, scan = anomaly_loss(
        torch.zeros(1, 2, 1), torch.full((1, 2), math.log(3)), torch.zeros(1, 2, 1), torch.tensor([[1.0, 0.0]])
    )
    assert scan.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-6)


def test_maps_travel_with_the_crops_through_flips_rotations_and_scale():
    config = AugmentConfig(
        n_global=2, global_size=16, global_scale=(0.5, 1.0), n_local=0, rotation_deg=20, intensity_prob=0.0,
        blur_prob=0.0, flip_prob=(0.5, 0.5, 0.5), windows=[(0.0, 2000.0)],
    )  # fmt: skip
    hu = torch.randn(3, 1, 24, 24, 24) * 100
    global_crops, _, global_maps = MultiCropAugment(config)(hu, torch.Generator().manual_seed(1), maps=hu / 2)
    # The map is half the HU everywhere, so its crops are half the HU crops, read back through the window.
    assert global_maps.shape == (6, 1, 16, 16, 16)
    assert torch.allclose(window_channels(2 * global_maps, config.windows), global_crops, atol=1e-5)


def test_a_whole_unrotated_volume_crop_is_the_volume_mirrored_as_resampling_gives_it():
    config = AugmentConfig(global_scale=(1.0, 1.0), rotation_deg=0.0, flip_prob=(0.5, 0.5, 0.5))
    hu = torch.randn(3, 2, 16, 16, 16) * 100
    boxes = sample_boxes(2, 3, (16, 16, 16), (1.0, 1.0), config, torch.Generator().manual_seed(0))
    crops = sample_crops(hu, boxes, 16)
    assert boxes.flip.any() and not boxes.flip.all()
    for row in range(6):
        flipped = [1 + axis for axis in range(3) if boxes.flip[row, axis]]
        assert torch.equal(crops[row], hu[row % 3].flip(flipped))
    # The same crops through affine_grid and grid_sample, to float32 rounding of the sample points.
    theta = _affine_theta(boxes, (16, 16, 16))
    grid = F.affine_grid(theta, [6, 2, 16, 16, 16], align_corners=False)
    resampled = F.grid_sample(hu.repeat(2, 1, 1, 1, 1), grid, padding_mode="border", align_corners=False)
    assert torch.allclose(crops, resampled, atol=1e-2)


def test_the_anomaly_config_is_checked():
    with pytest.raises(ConfigError, match="n_local"):
        load_config(PretrainConfig, "pretrain_synth_tiny", ["augment.n_local=2"])
    with pytest.raises(ConfigError, match="semi_axis_mm"):
        AnomalyConfig(semi_axis_mm=(5.0, 2.0))
    with pytest.raises(ConfigError, match="probability"):
        AnomalyConfig(probability=1.5)
    assert np.isclose(load_config(PretrainConfig, "pretrain_synth_tiny").anomaly.air_margin_mm, 9.0)
