"""Backbones and heads: the 3D ViT (:class:`ViT3D`) and the DINO/iBOT projection head (:class:`DINOHead`)."""

from fmct.models.heads import DINOHead
from fmct.models.vit3d import (
    SIZES,
    ViT3D,
    ViT3DConfig,
    build_vit3d,
    interpolate_pos_embed,
    sincos_pos_embed_3d,
)

__all__ = ["SIZES", "DINOHead", "ViT3D", "ViT3DConfig", "build_vit3d", "interpolate_pos_embed", "sincos_pos_embed_3d"]
