"""Data pipeline: store dataset, deterministic sharded sampler, device-side multi-crop, iBOT masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmct.config import load_config
from fmct.data.augment import (
    AugmentConfig,
    CropBoxes,
    MultiCropAugment,
    crop_major_rows,
    sample_crops,
)
from fmct.data.dataset import StepBatchSampler, StoreVolumes, make_loader, step_generator
from fmct.data.masking import block_mask_3d, sample_ibot_masks
from fmct.errors import ConfigError, InputError, ScanError
from fmct.models.windows import model_input, window_channels
from fmct.store import write_scan

torch.set_num_threads(1)

# Geometry-only augmentation: one linear window (level 500, width 1000 HU: 0..1000 HU -> 0..1) and no
# intensity change, so a crop's values are HU / 1000.
LINEAR = dict(windows=[(500.0, 1000.0)], intensity_prob=0.0, blur_prob=0.0)


def coordinate_phantoms(shape=(20, 24, 28)) -> torch.Tensor:
    """Three volumes (3, 1, X, Y, Z) int16 whose HU are 10 x the voxel index along x, y, z in turn."""
    grids = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
    return torch.stack([10 * g for g in grids]).unsqueeze(1).to(torch.int16)


def expected_index(boxes: CropBoxes, size: int) -> torch.Tensor:
    """Input voxel index (N, S, S, S, 3) of every output voxel, from the box record alone."""
    fraction = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
    local = torch.stack(torch.meshgrid(fraction, fraction, fraction, indexing="ij"), dim=-1)  # (S,S,S,3)
    sign = 1 - 2 * boxes.flip.double()
    offset = local.unsqueeze(0) * (sign * boxes.size).view(-1, 1, 1, 1, 3)
    return boxes.centre.view(-1, 1, 1, 1, 3) + torch.einsum("nij,nabcj->nabci", boxes.rotation, offset)


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("rotation_deg,flip_prob", [(0.0, (0.0, 0.0, 0.0)), (10.0, (0.5, 0.5, 0.5))])
def test_crops_land_where_their_boxes_say(rotation_deg, flip_prob):
    shape = (20, 24, 28)
    phantoms = coordinate_phantoms(shape)
    config = AugmentConfig(
        n_global=2, global_size=9, n_local=3, local_size=5, rotation_deg=rotation_deg, flip_prob=flip_prob, **LINEAR
    )
    global_crops, local_crops, global_boxes, local_boxes = MultiCropAugment(config)(
        phantoms, torch.Generator().manual_seed(3), return_boxes=True
    )
    extent_max = torch.tensor(shape, dtype=torch.float64) - 1
    for crops, boxes, size in ((global_crops, global_boxes, 9), (local_crops, local_boxes, 5)):
        # Trilinear sampling is exact on a linear phantom; beyond the edge it repeats the edge voxel.
        index = torch.minimum(expected_index(boxes, size).clamp_min(0), extent_max)
        batch = phantoms.shape[0]
        for row in range(crops.shape[0]):
            axis = row % batch  # crop-major: row k is volume k % B
            hu = crops[row, 0].double() * 1000
            assert torch.allclose(hu, 10 * index[row, ..., axis], atol=0.05), (row, axis)
    if rotation_deg == 0:
        # The centre voxel of an odd-sized crop is the input at the box centre (within 0.05 HU).
        centre_hu = global_crops[:, 0, 4, 4, 4].double() * 1000
        axes = torch.arange(global_crops.shape[0]) % 3
        assert torch.allclose(centre_hu, 10 * global_boxes.centre[torch.arange(6), axes], atol=0.05)
    else:
        assert 0 < global_boxes.flip.sum() < global_boxes.flip.numel()
        trace = global_boxes.rotation.diagonal(dim1=1, dim2=2).sum(1)
        angles = torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))
        assert float(angles.max()) <= 10.0 + 1e-6 and float(angles.max()) > 1.0


def test_box_scales_and_positions_follow_the_config():
    shape = (32, 32, 32)
    config = AugmentConfig(global_size=8, local_size=4, n_local=6, **LINEAR)
    hu = torch.zeros((4, 1) + shape, dtype=torch.int16)
    _, _, global_boxes, local_boxes = MultiCropAugment(config)(hu, torch.Generator().manual_seed(0), return_boxes=True)
    for boxes, (low, high) in ((global_boxes, config.global_scale), (local_boxes, config.local_scale)):
        fraction = boxes.size.prod(dim=1) / 32**3
        assert float(fraction.min()) >= low - 1e-9 and float(fraction.max()) <= high + 1e-9
        # Cubic boxes (aspect preserved) whose unrotated extent lies inside the volume.
        assert torch.allclose(boxes.size, boxes.size[:, :1].expand(-1, 3))
        assert float((boxes.centre - boxes.size / 2).min()) >= -0.5 - 1e-9
        assert float((boxes.centre + boxes.size / 2).max()) <= 31.5 + 1e-9
    assert global_boxes.centre.shape == (8, 3) and local_boxes.centre.shape == (24, 3)


def test_left_right_flip_mirrors_the_crop():
    hu = torch.randint(-1000, 2000, (2, 1, 16, 16, 16), dtype=torch.int16)
    common = dict(global_size=8, n_local=2, local_size=4, rotation_deg=10.0, **LINEAR)
    plain = MultiCropAugment(AugmentConfig(flip_prob=(0.0, 0.0, 0.0), **common))
    flipped = MultiCropAugment(AugmentConfig(flip_prob=(1.0, 0.0, 0.0), **common))
    for a, b in zip(plain(hu, torch.Generator().manual_seed(7)), flipped(hu, torch.Generator().manual_seed(7))):
        assert torch.allclose(b, a.flip(2), atol=1e-5)  # dim 2 is x, the left-right axis
        assert not torch.allclose(b, a, atol=1e-3)


def test_crops_are_crop_major():
    hu = torch.stack([torch.full((1, 12, 12, 12), 0), torch.full((1, 12, 12, 12), 80)]).to(torch.int16)
    config = AugmentConfig(global_size=6, n_local=3, local_size=4, windows=[(40.0, 80.0)], intensity_prob=0.0)
    global_crops, local_crops = MultiCropAugment(config)(hu, torch.Generator().manual_seed(1))
    for crops in (global_crops, local_crops):
        per_row = crops.flatten(1).mean(1)
        # A blurred crop of a constant volume keeps its value up to float32 rounding of the kernel's sum.
        assert torch.allclose(per_row, torch.tensor([0.0, 1.0] * (crops.shape[0] // 2)), atol=1e-6)


# ------------------------------------------------------------------------------------------ intensity
def test_window_mapping_in_hu():
    hu = torch.tensor([-1000.0, 0.0, 40.0, 80.0, -20.0, 180.0, 3000.0]).view(1, 1, 7)
    brain, subdural, bone = window_channels(hu)[0]
    assert brain.tolist() == [0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    assert subdural[3].item() == 0.5 and subdural[4].item() == 0.0 and subdural[5].item() == 1.0
    assert bone[0].item() == 0.0 and bone[-1].item() == 1.0
    assert bone[1].item() == pytest.approx(800 / 2800)  # bone window spans -800..2000 HU


def test_model_input_is_the_full_volume_crop():
    hu = torch.randint(-1000, 2000, (2, 1, 16, 16, 16), dtype=torch.int16)
    embedded = model_input(hu, size=12)
    assert embedded.shape == (2, 3, 12, 12, 12) and embedded.dtype == torch.float32
    full = CropBoxes(
        centre=torch.full((2, 3), 7.5, dtype=torch.float64),
        size=torch.full((2, 3), 16.0, dtype=torch.float64),
        flip=torch.zeros(2, 3, dtype=torch.bool),
        rotation=torch.eye(3, dtype=torch.float64).expand(2, 3, 3),
    )
    # Equal up to float32 rounding of the sampling positions (below 0.01 HU).
    assert torch.allclose(embedded, window_channels(sample_crops(hu.float(), full, 12)), atol=1e-4)
    constant = model_input(torch.full((1, 1, 10, 10, 10), 40, dtype=torch.int16), size=(4, 6, 8))
    assert constant.shape == (1, 3, 4, 6, 8) and torch.all(constant[0, 0] == 0.5)


def test_noise_jitter_and_gamma_stay_in_their_ranges():
    hu = torch.zeros((2, 1, 16, 16, 16), dtype=torch.int16)
    config = AugmentConfig(
        global_size=8,
        n_local=4,
        local_size=6,
        windows=[(0.0, 2000.0)],
        intensity_prob=1.0,
        blur_prob=0.0,
        noise_std_hu=20.0,
        window_level_jitter_hu=0.0,
        window_width_jitter=0.0,
        gamma_range=(1.0, 1.0),
    )
    _, local_crops = MultiCropAugment(config)(hu, torch.Generator().manual_seed(2))
    noise_hu = (local_crops - 0.5) * 2000  # 0 HU sits at 0.5 in a (0, 2000) window
    std = noise_hu.flatten(1).std(1)
    assert float(std.max()) <= 20.0 * 1.2 and float(std.max()) > 5.0
    # Gamma alone: a 40 HU volume at 0.5 in the brain window becomes 0.5 ** gamma, gamma in range.
    config = AugmentConfig(
        global_size=6,
        n_local=0,
        windows=[(40.0, 80.0)],
        intensity_prob=1.0,
        noise_std_hu=0.0,
        window_level_jitter_hu=0.0,
        window_width_jitter=0.0,
        gamma_range=(0.8, 1.25),
    )
    global_crops, _ = MultiCropAugment(config)(torch.full((4, 1, 8, 8, 8), 40, dtype=torch.int16))
    gamma = torch.log(global_crops.flatten(1)) / np.log(0.5)
    assert torch.allclose(gamma, gamma[:, :1].expand_as(gamma), atol=1e-5)  # one gamma per crop
    assert float(gamma.min()) >= 0.8 - 1e-5 and float(gamma.max()) <= 1.25 + 1e-5 and float(gamma.std()) > 0.01
    # Window jitter alone: 40 HU at the brain window's level moves by at most 5 HU / (80 * 0.9).
    config = AugmentConfig(
        global_size=6,
        n_local=0,
        windows=[(40.0, 80.0)],
        intensity_prob=1.0,
        noise_std_hu=0.0,
        window_level_jitter_hu=5.0,
        window_width_jitter=0.1,
        gamma_range=(1.0, 1.0),
    )
    global_crops, _ = MultiCropAugment(config)(torch.full((4, 1, 8, 8, 8), 40, dtype=torch.int16))
    shift = (global_crops - 0.5).abs()
    assert float(shift.max()) <= 5.0 / 72 + 1e-6 and float(shift.max()) > 0.005


def test_blur_smooths_and_keeps_constants():
    config = AugmentConfig(
        global_size=8,
        n_local=0,
        windows=[(0.0, 4000.0)],
        intensity_prob=0.0,
        blur_prob=1.0,
        blur_sigma=(1.0, 1.0),
        rotation_deg=0.0,
        global_scale=(1.0, 1.0),
        flip_prob=(0.0, 0.0, 0.0),
    )
    noise = torch.randint(-1000, 1000, (1, 1, 8, 8, 8), dtype=torch.int16)
    sharp, _ = MultiCropAugment(AugmentConfig(**{**config.__dict__, "blur_prob": 0.0}))(noise)
    blurred, _ = MultiCropAugment(config)(noise)
    assert float(blurred.std()) < 0.6 * float(sharp.std())
    assert torch.allclose(blurred.mean(), sharp.mean(), atol=0.01)
    constant, _ = MultiCropAugment(config)(torch.full((1, 1, 8, 8, 8), 300, dtype=torch.int16))
    assert torch.allclose(constant, torch.full_like(constant, 0.575), atol=1e-6)  # edges included


def test_augment_is_deterministic_by_seed():
    hu = torch.randint(-1000, 2000, (2, 1, 16, 16, 16), dtype=torch.int16)
    augment = MultiCropAugment(AugmentConfig(global_size=8, n_local=2, local_size=4, blur_prob=0.5))
    first = augment(hu, torch.Generator().manual_seed(11))
    again = augment(hu, torch.Generator().manual_seed(11))
    other = augment(hu, torch.Generator().manual_seed(12))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], other[0])
    assert first[0].shape == (4, 3, 8, 8, 8) and first[1].shape == (4, 3, 4, 4, 4)
    assert float(first[0].min()) >= 0.0 and float(first[0].max()) <= 1.0


def test_a_global_batch_split_over_ranks_gets_the_crops_of_one_process():
    """Rank r of 2 holds volumes 2r, 2r+1 of a global batch of 4: its crops are exactly the rows of
    those volumes in the crops of one process holding all 4 (blur, noise and gamma on)."""
    hu = torch.randint(-1000, 2000, (4, 1, 16, 16, 16), dtype=torch.int16)
    augment = MultiCropAugment(AugmentConfig(global_size=8, n_local=3, local_size=4, blur_prob=0.5, intensity_prob=1.0))
    whole = augment(hu, torch.Generator().manual_seed(5), return_boxes=True)
    assert crop_major_rows(2, 4, 2, 2).tolist() == [2, 3, 6, 7]
    for rank in range(2):
        part = augment(
            hu[2 * rank : 2 * rank + 2],
            torch.Generator().manual_seed(5),
            return_boxes=True,
            first_volume=2 * rank,
            global_batch=4,
        )
        for n_crops, crops, reference in ((2, part[0], whole[0]), (3, part[1], whole[1])):
            rows = crop_major_rows(n_crops, 4, 2 * rank, 2)
            assert torch.equal(crops, reference[rows]), (rank, n_crops)
        assert torch.equal(part[2].centre, whole[2].centre[crop_major_rows(2, 4, 2 * rank, 2)])
    with pytest.raises(ValueError, match="not in a global batch of 4"):
        augment(hu[:2], first_volume=3, global_batch=4)


def test_ibot_masks_of_a_rank_are_its_rows_of_the_global_batch():
    generator = lambda: torch.Generator().manual_seed(8)  # noqa: E731
    whole = sample_ibot_masks(16, (4, 4, 4), (0.1, 0.5), 0.5, generator())
    rows = crop_major_rows(2, 8, 4, 4)  # rank 1 of 2, 4 volumes each, 2 global crops per volume
    part = sample_ibot_masks(16, (4, 4, 4), (0.1, 0.5), 0.5, generator(), rows=rows)
    assert part.shape == (8, 64) and torch.equal(part, whole[rows])
    assert int(whole.any(1).sum()) == 8


def test_config_from_overrides_and_bad_inputs_give_clear_errors():
    config = load_config(AugmentConfig, None, ["windows=[[40,80],[600,2800]]", "flip_prob=[0.5,0.5,0]", "n_local=4"])
    assert config.windows == [(40.0, 80.0), (600.0, 2800.0)] and config.flip_prob == (0.5, 0.5, 0.0)
    global_crops, local_crops = MultiCropAugment(config)(torch.zeros((1, 1, 8, 8, 8), dtype=torch.int16))
    assert global_crops.shape == (2, 2, 96, 96, 96) and local_crops.shape == (4, 2, 48, 48, 48)
    with pytest.raises(ConfigError, match="global_scale"):
        AugmentConfig(global_scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="windows"):
        AugmentConfig(windows=[(40.0, 0.0)])
    with pytest.raises(InputError, match="expected an HU batch"):
        MultiCropAugment()(torch.zeros(2, 16, 16, 16, dtype=torch.int16))


# ------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid", [(8, 8, 8), (4, 6, 8)])
def test_block_mask_count_is_exact(grid):
    generator = torch.Generator().manual_seed(0)
    n_tokens = int(np.prod(grid))
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):
        mask = block_mask_3d(grid, ratio, generator)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == int(ratio * n_tokens)  # floored, as DINOv2 counts
    # 0.77 * 192 = 147.84 and 0.77 * 512 = 394.24: a rounded count would differ at (4, 6, 8).
    assert int(block_mask_3d((4, 6, 8), 0.77, generator).sum()) == 147


def test_block_masks_come_in_blocks():
    mask = block_mask_3d((8, 8, 8), 0.4, torch.Generator().manual_seed(5)).numpy()
    padded = np.pad(mask, 1)
    neighbours = sum(np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1] for axis in range(3) for shift in (-1, 1))
    # Most masked tokens touch another masked token; scattered single tokens would rarely do (40% density).
    assert (neighbours[mask] > 0).mean() > 0.9
    assert (neighbours[mask] >= 3).mean() > 0.5


def test_ibot_masks_ratios_and_share():
    grid, batch = (8, 8, 8), 32
    masks = sample_ibot_masks(batch, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(4))
    assert masks.shape == (batch, 512) and masks.dtype == torch.bool
    counts = masks.sum(1)
    masked = counts > 0
    assert int(masked.sum()) == 16
    ratios = np.sort(counts[masked].numpy() / 512)
    assert ratios.min() >= 0.1 - 1 / 1024 and ratios.max() <= 0.5 + 1 / 1024
    # One ratio per equal bin of the range (DINOv2's spread), up to rounding to whole tokens.
    edges = np.linspace(0.1, 0.5, 17)
    assert np.all(ratios >= edges[:-1] - 1 / 1024) and np.all(ratios <= edges[1:] + 1 / 1024)
    assert not bool(masked[:16].all())  # shuffled, not the first half
    again = sample_ibot_masks(batch, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(masks, again)
    assert int(sample_ibot_masks(5, grid, mask_probability=1.0, generator=torch.Generator()).any(1).sum()) == 5


# ------------------------------------------------------------------------------------- store dataset
def make_store(path, n=6, shape=(6, 5, 4)):
    volumes = {}
    for i in range(n):
        scan_id = f"scan{i:03d}"
        hu = (np.arange(np.prod(shape)).reshape(shape) + 100 * i).astype(np.int16)
        write_scan(path, hu, {"scan_id": scan_id, "store_shape": list(shape)})
        volumes[scan_id] = hu
    return volumes


def test_store_volumes_reads_int16_and_skips_other_shapes(tmp_path):
    volumes = make_store(tmp_path)
    write_scan(tmp_path, np.zeros((3, 3, 3), np.int16), {"scan_id": "scan999", "store_shape": [3, 3, 3]})
    dataset = StoreVolumes(tmp_path)
    assert len(dataset) == 6 and dataset.shape == (6, 5, 4)
    assert dataset.skipped == [("scan999", "store_shape [3, 3, 3] differs from the dataset's [6, 5, 4]")]
    hu, index = dataset[2]
    assert hu.dtype == torch.int16 and hu.shape == (1, 6, 5, 4) and index == 2
    assert np.array_equal(hu[0].numpy(), volumes[dataset.scan_ids[2]])
    subset = StoreVolumes(tmp_path, scan_ids=["scan004", "scan001"])
    assert subset.scan_ids == ["scan004", "scan001"] and int(subset[1][0][0, 0, 0, 0]) == 100
    with pytest.raises(InputError, match="not in the store"):
        StoreVolumes(tmp_path, scan_ids=["nope"])


def test_store_volumes_names_a_damaged_file(tmp_path):
    make_store(tmp_path, n=2)
    (tmp_path / "scans" / "scan001.b2nd").write_bytes(b"not a volume file")
    dataset = StoreVolumes(tmp_path)
    with pytest.raises(ScanError, match=r"scan001\.b2nd: cannot read: not a volume file"):
        dataset[1]


def test_sampler_shards_cover_each_epoch_once():
    n, batch = 24, 3
    ranks = [StepBatchSampler(n, batch, seed=9, rank=r, world_size=2) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == 4
    for epoch in range(2):
        seen = [sum((s.batch_at(epoch * steps + k) for k in range(steps)), []) for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))
    assert ranks[0].batch_at(0) != ranks[0].batch_at(steps)  # reshuffled per epoch
    with pytest.raises(ValueError, match="do not fill one global batch"):
        StepBatchSampler(5, 3, world_size=2)


def test_sampler_resume_equals_continuation():
    full = list(StepBatchSampler(10, 3, seed=1, total_steps=12))
    resumed = list(StepBatchSampler(10, 3, seed=1, start_step=5, total_steps=12))
    assert resumed == full[5:] and len(full) == 12
    assert full != list(StepBatchSampler(10, 3, seed=2, total_steps=12))


def test_loader_batches_and_resume(tmp_path):
    make_store(tmp_path, n=8)
    dataset = StoreVolumes(tmp_path)
    batches = [(hu.clone(), idx.clone()) for hu, idx in make_loader(dataset, 2, seed=3, total_steps=6)]
    assert batches[0][0].shape == (2, 1, 6, 5, 4) and batches[0][0].dtype == torch.int16
    resumed = list(make_loader(dataset, 2, workers=1, seed=3, start_step=4, total_steps=6))
    assert len(resumed) == 2
    for (hu, idx), (hu_ref, idx_ref) in zip(resumed, batches[4:]):
        assert torch.equal(idx, idx_ref) and torch.equal(hu, hu_ref)


def test_step_generator_depends_on_seed_step_and_rank():
    draw = lambda *args: torch.rand(4, generator=step_generator(*args))  # noqa: E731
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))
