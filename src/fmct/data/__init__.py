"""Training data: the store as int16 batches (:mod:`.dataset`), multi-crop augmentation on the training
device (:mod:`.augment`) and iBOT block masks (:mod:`.masking`).

A pretraining step, in order::

    hu, indices = next(batches)                       # int16 (B, 1, X, Y, Z), X/Y/Z = model D/H/W
    generator = batch_generator(seed, step)           # the global batch's draws, the same on resume
    first, total = rank * B, world_size * B           # this rank's volumes in the global batch
    global_crops, local_crops = augment(hu.to(device, non_blocking=True), generator, first_volume=first,
                                        global_batch=total)
    masks = sample_ibot_masks(n_global * total, grid, generator=generator, device=device,
                              rows=crop_major_rows(n_global, total, first, B))
"""

from fmct.data.augment import (
    AugmentConfig,
    CropBoxes,
    MultiCropAugment,
    crop_major_rows,
    sample_boxes,
    sample_crops,
)
from fmct.data.dataset import StepBatchSampler, StoreVolumes, batch_generator, make_loader, step_generator
from fmct.data.masking import block_mask_3d, sample_ibot_masks

__all__ = [
    "AugmentConfig",
    "CropBoxes",
    "MultiCropAugment",
    "StepBatchSampler",
    "StoreVolumes",
    "batch_generator",
    "block_mask_3d",
    "crop_major_rows",
    "make_loader",
    "sample_boxes",
    "sample_crops",
    "sample_ibot_masks",
    "step_generator",
]
