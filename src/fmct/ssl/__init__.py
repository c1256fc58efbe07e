"""Self-supervised objectives: DINO (CLS), iBOT (masked patches), KoLeo, teacher centering, MAE."""

from fmct.ssl.centering import EMACenter, sinkhorn_knopp
from fmct.ssl.dino_loss import DINOLoss
from fmct.ssl.ibot_loss import iBOTPatchLoss
from fmct.ssl.koleo_loss import KoLeoLoss
from fmct.ssl.mae import MAEDecoder, MaskSplit, mae_loss, patchify3d, random_masking, unpatchify3d

__all__ = [
    "DINOLoss",
    "EMACenter",
    "KoLeoLoss",
    "MAEDecoder",
    "MaskSplit",
    "iBOTPatchLoss",
    "mae_loss",
    "patchify3d",
    "random_masking",
    "sinkhorn_knopp",
    "unpatchify3d",
]
