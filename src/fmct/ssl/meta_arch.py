"""The pretraining meta-architecture: the models (backbone + heads) and the methods that turn one batch
of crops into loss terms, apart from the training loop (:mod:`fmct.ssl.train`).

A method (:data:`METHODS`, chosen by ``config.method``) has one interface: ``build_model()`` gives the
student (the teacher, when ``has_teacher``, is its EMA copy); ``paint(hu, spacing_mm, generator,
first_volume, global_batch)`` may change the HU batch before it is cropped and returns it with maps
(B, K, X, Y, Z) that the crops carry along, or None (only the anomaly pretext paints); ``loss(student,
teacher, global_crops, local_crops, global_maps, generator, values, global_rows, n_crops)`` draws its
masks from ``generator`` for the global batch's ``n_crops`` global crops, keeps this rank's
``global_rows`` of them, and returns the step's loss terms (``loss`` the weighted sum) and statistics as
0-d tensors; ``after_clipping(student, values)`` edits the clipped gradients before the optimizer step;
``centers`` is its centring state, saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fmct.data import sample_ibot_masks
from fmct.devices import unwrap
from fmct.errors import ConfigError
from fmct.models import DINOHead, build_vit3d
from fmct.models.vit3d import grouped_parameters
from fmct.ssl.anomaly import anomaly_loss, change_targets, paint_changes
from fmct.ssl.centering import EMACenter, sinkhorn_knopp
from fmct.ssl.collapse import output_cosine, row_entropy, teacher_statistics
from fmct.ssl.config import PretrainConfig
from fmct.ssl.dino_loss import DINOLoss
from fmct.ssl.distributed import local_tensor
from fmct.ssl.ibot_loss import iBOTPatchLoss
from fmct.ssl.koleo_loss import KoLeoLoss
from fmct.ssl.mae import MAEDecoder, MaskSplit, mae_loss, patchify3d, random_masking
from fmct.ssl.schedules import StepValues


# ------------------------------------------------------------------------------------------- models
@dataclass
class SSLOutput:
    """What one model pass gives the losses. Rows of crop tensors are crop-major (crop 0 of every volume first)."""

    cls: torch.Tensor  # (n_global * B, C) CLS features of the global crops
    cls_logits: torch.Tensor  # (n_crops * B, K) DINO head on the CLS of all crops seen
    patch_logits: torch.Tensor  # (M, K_ibot) patch head on the M masked patches of the global crops


class DINOModel(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head): the student, and an EMA copy of it, the teacher."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.backbone = build_vit3d(config.model)
        dim, dino, ibot = self.backbone.embed_dim, config.dino, config.ibot
        head_shape = dict(hidden=dino.head_hidden_dim, bottleneck=dino.head_bottleneck_dim, n_layers=dino.head_n_layers)
        self.dino_head = DINOHead(dim, dino.n_prototypes, **head_shape)
        self.ibot_head = DINOHead(dim, ibot.n_prototypes, **head_shape) if ibot.separate_head else None

    @property
    def patch_head(self) -> DINOHead:
        """The head that scores patch tokens for iBOT: the DINO head itself unless ``ibot.separate_head``."""
        return self.dino_head if self.ibot_head is None else self.ibot_head

    def forward(
        self,
        global_crops: torch.Tensor,
        masked_index: torch.Tensor,
        masks: torch.Tensor | None = None,
        local_crops: torch.Tensor | None = None,
    ) -> SSLOutput:
        """Score crops (N, C, D, H, W) in [0, 1].

        ``masked_index`` (M,) long: flat indices ``crop * n_patches + patch`` of the patches the iBOT loss
        scores. ``masks`` (n_global * B, n_patches) bool: replace those patches by the mask token (the
        student); None shows the crops whole (the teacher). ``local_crops``: also score these CLS tokens.
        """
        features = self.backbone.forward_features(global_crops, masks=masks)
        cls = features["cls"]
        all_cls = cls if local_crops is None else torch.cat([cls, self.backbone(local_crops)])
        masked_patches = features["patch"].flatten(0, 1).index_select(0, masked_index)
        return SSLOutput(cls=cls, cls_logits=self.dino_head(all_cls), patch_logits=self.patch_head(masked_patches))

    def cancel_last_layer_gradients(self) -> None:
        """Keep the prototypes fixed for this step (DINO does so during the first epoch)."""
        self.dino_head.cancel_last_layer_gradients()
        if self.ibot_head is not None:
            self.ibot_head.cancel_last_layer_gradients()

    def clipped_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters whose gradients are clipped each group on its own (DINOv2 clips backbone and heads
        apart)."""
        modules = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            modules["ibot_head"] = self.ibot_head
        return {name: list(module.parameters()) for name, module in modules.items()}

    def param_groups(self, weight_decay: float, layer_decay: float, patch_embed_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups of the backbone (layer-wise LR decay) and the heads (LR scale 1), named as in the model."""
        groups = _prefixed(self.backbone.param_groups(weight_decay, layer_decay, patch_embed_lr_mult), "backbone.")
        groups += _prefixed(self.dino_head.param_groups(weight_decay), "dino_head.")
        if self.ibot_head is not None:
            groups += _prefixed(self.ibot_head.param_groups(weight_decay), "ibot_head.")
        return groups


class MAEModel(nn.Module):
    """Backbone on the visible patches + a light decoder that predicts the pixels of every patch."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.backbone = build_vit3d(config.model)
        # MAE drops hidden patches instead of replacing them: the mask token is never used, and a
        # parameter without gradient would stall DDP.
        self.backbone.mask_token.requires_grad_(False)
        model, mae = config.model, config.mae
        patch_dim = model.in_chans * math.prod(model.patch_size)
        self.decoder = MAEDecoder(
            self.backbone.embed_dim, patch_dim, model.grid_size, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads
        )

    def forward(self, crops: torch.Tensor, keep_idx: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, N, C * prod(patch)) of crops (B, C, D, H, W) from their ``keep_idx`` patches."""
        visible = self.backbone.forward_features(crops, keep_idx=keep_idx)["patch"]
        return self.decoder(visible, restore_idx)

    def clipped_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters whose gradients are clipped each group on its own."""
        return {"backbone": list(self.backbone.parameters()), "decoder": list(self.decoder.parameters())}

    def param_groups(self, weight_decay: float, layer_decay: float, patch_embed_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups of the backbone (layer-wise LR decay) and the decoder (LR scale 1), named as in the model."""
        decoder = grouped_parameters(self.decoder.named_parameters(), lambda name: 1.0, weight_decay)
        backbone = self.backbone.param_groups(weight_decay, layer_decay, patch_embed_lr_mult)
        return _prefixed(backbone, "backbone.") + _prefixed(decoder, "decoder.")


class AnomalyModel(nn.Module):
    """A backbone with change heads (:class:`fmct.models.vit3d.ChangeHeads`): per patch token (does this
    patch hold a change?) and on the CLS (does the scan hold any?), one logit per kind of change."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.backbone = build_vit3d(config.model)
        if self.backbone.change_head is None:
            raise ConfigError("method anomaly needs model.change_heads=true")
        self.backbone.mask_token.requires_grad_(False)  # nothing is masked: unused, and DDP needs every grad

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch logits (B, K, N), N in patch order, and scan logits (B, K) of crops (B, C, D, H, W), K the
        kinds of change (``model.change_kinds``)."""
        tokens = self.backbone.forward_features(crops)
        return self.backbone.change_head.patch(tokens["patch"]).transpose(1, 2), tokens["change"]

    def clipped_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters whose gradients are clipped each group on its own: the backbone's, the heads'."""
        heads = list(self.backbone.change_head.parameters())
        named = self.backbone.named_parameters()
        return {"backbone": [p for name, p in named if not name.startswith("change_head.")], "heads": heads}

    def param_groups(self, weight_decay: float, layer_decay: float, patch_embed_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups of the backbone (layer-wise LR decay; the change heads at LR scale 1)."""
        return _prefixed(self.backbone.param_groups(weight_decay, layer_decay, patch_embed_lr_mult), "backbone.")


def _prefixed(groups: list[dict], prefix: str) -> list[dict]:
    # Group "names" are the parameters' names in the whole model, as the checkpoint keys them.
    for group in groups:
        group["names"] = [prefix + name for name in group["names"]]
    return groups


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA: every teacher parameter and floating-point buffer becomes ``momentum * teacher + (1 - momentum) *
    student``; integer buffers (batch-norm step counts) are copied."""
    teacher = unwrap(teacher)
    if hasattr(teacher, "reshard"):
        # FSDP2 keeps the root's parameters gathered after a forward that no backward follows (the
        # teacher's): shard them again, so that each rank updates its shard from the student's shard.
        teacher.reshard()
    teacher_params = [local_tensor(p) for p in teacher.parameters()]
    student_params = [local_tensor(p.detach()) for p in unwrap(student).parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
    # Batch-norm statistics (the conv stem's) are buffers: the teacher runs in eval mode and never updates
    # them itself, so without this it would normalise by its initial mean 0 and variance 1 forever.
    for teacher_buffer, student_buffer in zip(teacher.buffers(), unwrap(student).buffers()):
        if teacher_buffer.is_floating_point():
            local_tensor(teacher_buffer).lerp_(local_tensor(student_buffer), 1.0 - momentum)
        else:
            local_tensor(teacher_buffer).copy_(local_tensor(student_buffer))


# ------------------------------------------------------------------------------------------ methods
class Method:
    """What every method shares: no painting before the crops, nothing to do after clipping."""

    has_teacher = False

    def __init__(self, config: PretrainConfig, device: torch.device):
        self.config, self.device = config, device
        self.centers: dict[str, EMACenter] = {}

    def paint(
        self,
        hu: torch.Tensor,
        spacing_mm: float | None,
        generator: torch.Generator,
        first_volume: int,
        global_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The HU batch unchanged, and no maps."""
        return hu, None

    def after_clipping(self, student: nn.Module, values: StepValues) -> None:
        """Nothing to do: no frozen layer."""


class DINOMethod(Method):
    """DINO + iBOT + KoLeo (DINOv2's formulation): a student and its EMA teacher, multi-crop, iBOT masks
    on the global crops; holds the teacher targets' centring state (EMA centres if used)."""

    has_teacher = True

    def __init__(self, config: PretrainConfig, device: torch.device):
        super().__init__(config, device)
        dino, ibot = config.dino, config.ibot
        self.dino_loss = DINOLoss(dino.n_prototypes, dino.student_temp, chunk_size=dino.chunk_size)
        self.ibot_loss = iBOTPatchLoss(
            ibot.n_prototypes if ibot.separate_head else dino.n_prototypes,
            dino.student_temp,
            chunk_rows=ibot.chunk_rows,
        )
        self.koleo_loss = KoLeoLoss()
        if dino.centering == "ema":
            self.centers = {
                "dino": EMACenter(dino.n_prototypes, dino.center_momentum).to(device),
                "ibot": EMACenter(self.ibot_loss.out_dim, dino.center_momentum).to(device),
            }

    def build_model(self) -> DINOModel:
        return DINOModel(self.config)

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        global_maps: None,
        generator: torch.Generator,
        values: StepValues,
        global_rows: torch.Tensor,
        n_crops: int,
    ) -> dict[str, torch.Tensor]:
        """The step's loss terms and teacher statistics; the iBOT masks are drawn from ``generator`` for
        all ``n_crops`` global crops of the global batch, this rank's rows ``global_rows`` kept."""
        config = self.config
        masks = sample_ibot_masks(
            n_crops,
            config.model.grid_size,
            config.ibot.mask_ratio,
            config.ibot.mask_probability,
            generator=generator,
            rows=global_rows,
        )
        masked_index = masks.flatten().nonzero().squeeze(1)  # on the CPU: no device sync
        return self.objective(
            student,
            teacher,
            global_crops,
            local_crops if len(local_crops) else None,
            masks.to(self.device, non_blocking=True),
            masked_index.to(self.device, non_blocking=True),
            values.teacher_temp,
            values.dino_weight,
        )

    def after_clipping(self, student: nn.Module, values: StepValues) -> None:
        """Drop the last layer's gradients while it is frozen (after clipping, as DINOv2's frozen last
        layer still counts in the clip norm)."""
        if values.freeze_last_layer:
            student.cancel_last_layer_gradients()

    def targets(self, logits: torch.Tensor, temp: float, name: str) -> torch.Tensor:
        """Teacher probabilities (rows, K) from teacher logits: Sinkhorn-Knopp or EMA centre, then ``temp``."""
        if not self.centers:
            return sinkhorn_knopp(logits, temp, self.config.dino.sinkhorn_iterations)
        return self.centers[name](logits, temp)

    def objective(
        self,
        student: nn.Module,
        teacher: nn.Module,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None,
        masks: torch.Tensor,
        masked_index: torch.Tensor,
        teacher_temp: float,
        dino_weight: float,
    ) -> dict[str, torch.Tensor]:
        """Loss terms (scalars) and teacher statistics of one batch; ``loss`` is the weighted sum, the
        DINO term weighted by ``dino_weight`` (the schedule's: 0 before ``dino.start_epochs``)."""
        config = self.config
        n_global = config.augment.n_global
        batch = global_crops.shape[0] // n_global
        with torch.no_grad():
            teacher_out = teacher(global_crops, masked_index)
            teacher_cls = self.targets(teacher_out.cls_logits, teacher_temp, "dino")
            teacher_patch = self.targets(teacher_out.patch_logits, teacher_temp, "ibot")
        student_out = student(global_crops, masked_index, masks=masks, local_crops=local_crops)
        n_prototypes = teacher_cls.shape[-1]
        student_cls_logits = student_out.cls_logits.view(-1, batch, n_prototypes)  # (crops, B, K), crop-major rows
        dino = self.dino_loss(student_cls_logits, teacher_cls.view(n_global, batch, n_prototypes))
        ibot = self.ibot_loss(student_out.patch_logits, teacher_patch, masks)
        koleo = sum(self.koleo_loss(cls) for cls in student_out.cls.chunk(n_global))
        loss = dino_weight * dino + config.ibot.loss_weight * ibot + config.koleo.loss_weight * koleo
        return {
            "loss": loss,
            "dino_loss": dino,
            "ibot_loss": ibot,
            "koleo_loss": koleo,
            **teacher_statistics(teacher_cls),
            "teacher_entropy_ibot": row_entropy(teacher_patch),
            "teacher_cosine": output_cosine(teacher_out.cls_logits[:batch]),
        }


class MAEMethod(Method):
    """MAE: the student encodes the visible 25% of each global crop's patches and reconstructs the rest."""

    def build_model(self) -> MAEModel:
        return MAEModel(self.config)

    def loss(
        self,
        student: nn.Module,
        teacher: None,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        global_maps: None,
        generator: torch.Generator,
        values: StepValues,
        global_rows: torch.Tensor,
        n_crops: int,
    ) -> dict[str, torch.Tensor]:
        """The MAE loss of the global crops, the hidden patches drawn from ``generator`` for all
        ``n_crops`` global crops of the global batch, this rank's rows ``global_rows`` kept."""
        config = self.config
        split = random_masking(n_crops, math.prod(config.model.grid_size), config.mae.mask_ratio, generator=generator)
        split = MaskSplit(*(t[global_rows].to(self.device, non_blocking=True) for t in split))
        pred = student(global_crops, split.keep_idx, split.restore_idx)
        loss = mae_loss(pred, patchify3d(global_crops, config.model.patch_size), split.mask, config.mae.norm_pix)
        return {"loss": loss, "mae_loss": loss}


class AnomalyMethod(Method):
    """Synthetic anomalies (:mod:`fmct.ssl.anomaly`): changes painted into the HU batch before it is
    cropped, found again per patch and per crop in the global crops."""

    def build_model(self) -> AnomalyModel:
        return AnomalyModel(self.config)

    def paint(
        self,
        hu: torch.Tensor,
        spacing_mm: float | None,
        generator: torch.Generator,
        first_volume: int,
        global_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with its changes painted in (float HU) and their visibility maps (B, K, X, Y, Z)."""
        if spacing_mm is None:
            raise ConfigError(
                "method anomaly paints its changes in mm: the store's manifest records no store_spacing_mm"
            )
        return paint_changes(hu, spacing_mm, self.config.anomaly, generator, first_volume, global_batch)

    def loss(
        self,
        student: nn.Module,
        teacher: None,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        global_maps: torch.Tensor,
        generator: torch.Generator,
        values: StepValues,
        global_rows: torch.Tensor,
        n_crops: int,
    ) -> dict[str, torch.Tensor]:
        """Per-patch and per-crop cross-entropy of where the changes are in the global crops."""
        patch_targets, scan_targets = change_targets(global_maps, self.config.model.patch_size)
        patch_logits, scan_logits = student(global_crops)
        patch, scan = anomaly_loss(patch_logits, scan_logits, patch_targets, scan_targets)
        loss = patch + self.config.anomaly.scan_loss_weight * scan
        return {"loss": loss, "patch_change_loss": patch, "scan_change_loss": scan}


# The pretraining methods by ``config.method``: each builds its model and computes its loss alike.
METHODS = {"dino": DINOMethod, "mae": MAEMethod, "anomaly": AnomalyMethod}


def build_method(config: PretrainConfig, device: torch.device) -> Method:
    """The method of ``config.method`` on ``device``."""
    return METHODS[config.method](config, device)
