"""Training data: the store as int16 batches (:mod:`.dataset`), multi-crop augmentation on the training
device (:mod:`.augment`) and iBOT block masks (:mod:`.masking`).

A pretraining step, in order::

    hu, indices = next(batches)                       # int16 (B, 1, X, Y, Z), X/Y/Z = model D/H/W
    generator = step_generator(seed, step, rank)      # the step's random draws, the same on resume
    global_crops, local_crops = augment(hu.to(device, non_blocking=True), generator)
    masks = sample_ibot_masks(len(global_crops), grid, generator=generator, device=device)
"""

from fmct.data.augment import (
    DEFAULT_WINDOWS,
    AugmentConfig,
    CropBoxes,
    MultiCropAugment,
    embed_transform,
    sample_boxes,
    sample_crops,
    window_channels,
)
from fmct.data.dataset import StepBatchSampler, StoreVolumes, make_loader, step_generator
from fmct.data.masking import block_mask_3d, sample_ibot_masks

__all__ = [
    "DEFAULT_WINDOWS",
    "AugmentConfig",
    "CropBoxes",
    "MultiCropAugment",
    "StepBatchSampler",
    "StoreVolumes",
    "block_mask_3d",
    "embed_transform",
    "make_loader",
    "sample_boxes",
    "sample_crops",
    "sample_ibot_masks",
    "step_generator",
    "window_channels",
]
