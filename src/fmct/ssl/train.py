"""Self-supervised pretraining of a :class:`~fmct.models.ViT3D` on the store: DINO + iBOT + KoLeo
(DINOv2's formulation) or MAE. ``fmct pretrain`` calls :func:`pretrain`.

One DINO step, in order:

1. the schedules give the learning rate, weight decay, teacher momentum and temperature of the step;
2. the loader's int16 HU batch goes to the device, where :class:`~fmct.data.MultiCropAugment` makes the
   global and local crops and :func:`~fmct.data.sample_ibot_masks` masks some global crops, drawn for
   the global batch from ``batch_generator(seed, step)`` (each rank keeps its volumes' rows);
3. the teacher (an EMA of the student, no gradient) sees the unmasked global crops; its CLS logits and
   the logits of the masked patches are balanced (Sinkhorn-Knopp) or centred (EMA) and sharpened;
4. the student sees all crops, masked patches replaced by the mask token; loss = DINO (CLS, teacher
   global views -> student views of the other crops) + iBOT (masked patches) + KoLeo (student CLS);
5. backward; gradient clipping per module (backbone, DINO head, iBOT head, as DINOv2); the last
   layer's gradients dropped during the first epoch; AdamW; the teacher moves towards the student.

An MAE step encodes the visible 25% of each global crop's patches and reconstructs the rest.

A run folder holds ``config.yaml`` (resolved config), ``log.jsonl`` (one line per logging step),
``checkpoint.pt`` (:mod:`fmct.ssl.checkpoint`), ``tensorboard/`` (when TensorBoard is installed) and ``backbone/`` (the teacher backbone as safetensors +
config.json through :func:`fmct.hub.save`, refreshed with every checkpoint). Run again on the same
folder, the job resumes from the checkpoint and reaches the weights of a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fmct import hub
from fmct.config import ConfigError, load_config, save_config, to_dict
from fmct.data import (MultiCropAugment, StoreVolumes, batch_generator, crop_major_rows, make_loader, sample_ibot_masks,
                       step_generator)
from fmct.distributed import DistEnv, all_reduce_max, all_reduce_mean, close_distributed, init_distributed
from fmct.models import DINOHead, ViT3D, build_vit3d
from fmct.models.vit3d import grouped_parameters
from fmct.ssl.centering import EMACenter, sinkhorn_knopp
from fmct.ssl.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from fmct.ssl.config import RESUMABLE_KEYS, DataConfig, EngineConfig, PretrainConfig
from fmct.ssl.dino_loss import DINOLoss
from fmct.ssl.distributed import full_tensor, local_tensor, unwrap, wrap_student, wrap_teacher
from fmct.ssl.ibot_loss import iBOTPatchLoss
from fmct.ssl.koleo_loss import KoLeoLoss
from fmct.ssl.mae import MAEDecoder, MaskSplit, mae_loss, patchify3d, random_masking
from fmct.ssl.online_eval import OnlineEvaluator, build_online_evaluator
from fmct.ssl.schedules import Schedules, StepValues
from fmct.store import Store
from fmct.atomic import atomic_write_text

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
BACKBONE_DIR = "backbone"
# DINO's two collapses. One prototype holding more than COLLAPSE_TOP_MASS of the teacher's probability
# over a batch of at least COLLAPSE_MIN_ROWS crops: every scan gets the same target. Teacher rows with
# more than UNIFORM_ENTROPY of the maximal entropy ln K once the teacher temperature is warm: the teacher
# does not tell scans apart (expected at the start, when the backbone's CLS barely depends on its input).
COLLAPSE_TOP_MASS = 0.5
COLLAPSE_MIN_ROWS = 16
UNIFORM_ENTROPY = 0.99
# A DINO head whose outputs for different scans have a mean cosine above this maps every scan alike.
COLLAPSE_COSINE = 0.95


class PretrainError(RuntimeError):
    """A run that had to stop (a non-finite loss); ``str(error)`` is one line saying why and what was kept."""


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

    def forward(self, global_crops: torch.Tensor, masked_index: torch.Tensor, masks: torch.Tensor | None = None,
                local_crops: torch.Tensor | None = None) -> SSLOutput:
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

    def clipped_modules(self) -> dict[str, nn.Module]:
        """The modules whose gradients are clipped each on its own (DINOv2 clips backbone and heads apart)."""
        modules = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            modules["ibot_head"] = self.ibot_head
        return modules

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
        self.decoder = MAEDecoder(self.backbone.embed_dim, patch_dim, model.grid_size, mae.decoder_dim,
                                  mae.decoder_depth, mae.decoder_heads)

    def forward(self, crops: torch.Tensor, keep_idx: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, N, C * prod(patch)) of crops (B, C, D, H, W) from their ``keep_idx`` patches."""
        visible = self.backbone.forward_features(crops, keep_idx=keep_idx)["patch"]
        return self.decoder(visible, restore_idx)

    def clipped_modules(self) -> dict[str, nn.Module]:
        """The modules whose gradients are clipped each on its own."""
        return {"backbone": self.backbone, "decoder": self.decoder}

    def param_groups(self, weight_decay: float, layer_decay: float, patch_embed_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups of the backbone (layer-wise LR decay) and the decoder (LR scale 1), named as in the model."""
        decoder = grouped_parameters(self.decoder.named_parameters(), lambda name: 1.0, weight_decay)
        backbone = self.backbone.param_groups(weight_decay, layer_decay, patch_embed_lr_mult)
        return _prefixed(backbone, "backbone.") + _prefixed(decoder, "decoder.")


def _prefixed(groups: list[dict], prefix: str) -> list[dict]:
    # Group "names" are the parameters' names in the whole model, as the checkpoint keys them.
    for group in groups:
        group["names"] = [prefix + name for name in group["names"]]
    return groups


def build_optimizer(model: nn.Module, config: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s groups (layer-wise LR scale, no decay on norms/biases/tokens), fused on CUDA."""
    optim = config.optim
    groups = unwrap(model).param_groups(optim.weight_decay, optim.layer_decay, optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, fused=device.type == "cuda")


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA: every teacher parameter becomes ``momentum * teacher + (1 - momentum) * student``."""
    teacher = unwrap(teacher)
    if hasattr(teacher, "reshard"):
        # FSDP2 keeps the root's parameters gathered after a forward that no backward follows (the
        # teacher's): shard them again, so that each rank updates its shard from the student's shard.
        teacher.reshard()
    teacher_params = [local_tensor(p) for p in teacher.parameters()]
    student_params = [local_tensor(p.detach()) for p in unwrap(student).parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


# ------------------------------------------------------------------------------------------- losses
class DINOObjective:
    """DINO + iBOT + KoLeo for one step, with the teacher targets' centring state (EMA centres if used)."""

    def __init__(self, config: PretrainConfig, device: torch.device):
        self.config = config
        dino, ibot = config.dino, config.ibot
        self.dino_loss = DINOLoss(dino.n_prototypes, dino.student_temp, chunk_size=dino.chunk_size)
        self.ibot_loss = iBOTPatchLoss(ibot.n_prototypes if ibot.separate_head else dino.n_prototypes, dino.student_temp,
                                       chunk_rows=ibot.chunk_rows)
        self.koleo_loss = KoLeoLoss()
        self.centers: dict[str, EMACenter] = {}
        if dino.centering == "ema":
            self.centers = {
                "dino": EMACenter(dino.n_prototypes, dino.center_momentum).to(device),
                "ibot": EMACenter(self.ibot_loss.out_dim, dino.center_momentum).to(device),
            }

    def targets(self, logits: torch.Tensor, temp: float, name: str) -> torch.Tensor:
        """Teacher probabilities (rows, K) from teacher logits: Sinkhorn-Knopp or EMA centre, then ``temp``."""
        if not self.centers:
            return sinkhorn_knopp(logits, temp, self.config.dino.sinkhorn_iterations)
        return self.centers[name](logits, temp)

    def __call__(self, student: nn.Module, teacher: nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                 masks: torch.Tensor, masked_index: torch.Tensor, teacher_temp: float,
                 dino_weight: float) -> dict[str, torch.Tensor]:
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
        return {"loss": loss, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo, **teacher_statistics(teacher_cls),
                "teacher_entropy_ibot": row_entropy(teacher_patch),
                "teacher_cosine": output_cosine(teacher_out.cls_logits[:batch])}


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats, at most ln K) of the rows of probabilities (rows, K); 0-d, NaN for no rows."""
    probs = probs.detach().float()
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


def output_cosine(logits: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the logit rows (rows, K) of different volumes: near 1 when the head
    maps every scan to the same output (the collapse Sinkhorn-Knopp hides, as it spreads any batch over
    all prototypes), near 0 for a head that tells scans apart."""
    unit = torch.nn.functional.normalize(logits.detach().float(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        return unit.new_full((), float("nan"))
    similarity = unit @ unit.T
    return (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))


def teacher_statistics(teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse indicators of the teacher's DINO (CLS) probabilities (rows, K), as 0-d tensors (no device sync).

    ``teacher_entropy``: mean entropy of a row's distribution over prototypes (nats, at most ln K).
    ``teacher_top_mass``: the largest share of the batch's total probability held by one prototype.
    ``teacher_rows``: the number of rows (crops) these statistics come from.
    """
    probs = teacher_probs.detach().float()
    return {"teacher_entropy": row_entropy(probs), "teacher_top_mass": probs.mean(dim=0).max(),
            "teacher_rows": probs.new_full((), float(probs.shape[0]))}  # a fill kernel: no host-to-device copy


def collapse_reason(metrics: dict[str, float], n_prototypes: int, teacher_warm: bool) -> str | None:
    """Why logged teacher statistics look collapsed (one sentence), or None when they look healthy.

    ``n_prototypes`` is K of the DINO head; ``teacher_warm`` says the teacher temperature warm-up is over.
    """
    top_mass, entropy = metrics.get("teacher_top_mass"), metrics.get("teacher_entropy")
    if top_mass is None:  # MAE: no teacher
        return None
    if metrics.get("teacher_rows", 0) >= COLLAPSE_MIN_ROWS and top_mass > COLLAPSE_TOP_MASS:
        return (f"one prototype holds {top_mass:.0%} of the teacher's mass (teacher entropy {entropy:.3f} nats): "
                f"every scan gets the same target, the representation is collapsing; try "
                f"dino.centering=sinkhorn_knopp, a lower optim.base_lr or a longer warm-up")
    cosine = metrics.get("teacher_cosine", 0.0)
    if teacher_warm and cosine > COLLAPSE_COSINE:
        return (f"the teacher's DINO head gives every scan nearly the same output (mean cosine {cosine:.3f} between "
                f"scans): its targets carry no information about the scan; try dino.start_epochs > 0 (iBOT and "
                f"KoLeo first), model.layerscale_init=null or a higher optim.base_lr")
    max_entropy = math.log(n_prototypes)
    if teacher_warm and entropy > UNIFORM_ENTROPY * max_entropy:
        return (f"the teacher's targets are nearly uniform (entropy {entropy:.3f} of at most {max_entropy:.3f} nats) "
                f"after the temperature warm-up: the teacher does not tell scans apart and the DINO term cannot "
                f"fall below ln K; try a lower dino.teacher_temp, a lower optim.teacher_momentum or more varied data")
    return None


def mae_objective(student: nn.Module, global_crops: torch.Tensor, split: MaskSplit,
                  config: PretrainConfig) -> dict[str, torch.Tensor]:
    """The MAE loss of one batch of global crops, hidden patches ``split``."""
    pred = student(global_crops, split.keep_idx, split.restore_idx)
    loss = mae_loss(pred, patchify3d(global_crops, config.model.patch_size), split.mask, config.mae.norm_pix)
    return {"loss": loss, "mae_loss": loss}


# --------------------------------------------------------------------------------------- one step
class Trainer:
    """The student, teacher, optimizer and objective of a run on one process, and its training step.

    Built from a seed that is the same on every rank, so that all replicas start from identical
    weights; wrapped for DDP or FSDP2 when the process is part of a torchrun job.
    """

    def __init__(self, config: PretrainConfig, env: DistEnv, schedules: Schedules):
        self.config, self.env, self.schedules = config, env, schedules
        engine = config.engine
        torch.manual_seed(engine.seed)
        model_class = DINOModel if config.method == "dino" else MAEModel
        student = model_class(config).to(env.device)
        teacher = deepcopy(student).eval().requires_grad_(False) if config.method == "dino" else None
        if engine.compile:
            compile_blocks([student, teacher])
        self.student = wrap_student(student, env, engine.sharding).train()
        self.teacher = wrap_teacher(teacher, env, engine.sharding) if teacher is not None else None
        self.optimizer = build_optimizer(self.student, config, env.device)
        self.objective = DINOObjective(config, env.device) if config.method == "dino" else None
        self.centers = self.objective.centers if self.objective is not None else {}
        self.augment = MultiCropAugment(config.augment)
        self.autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda" and engine.bf16)

    def step(self, hu: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Train on one batch ``hu`` (B, 1, X, Y, Z) int16 HU at global step ``step``; return the step's metrics.

        The metrics stay on the device (0-d tensors: loss terms, grad_norm, teacher statistics), so the
        host never waits for the device here.
        """
        config, device = self.config, self.env.device
        values = self.schedules.at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = values.lr * group["lr_scale"]
            group["weight_decay"] = values.weight_decay * group["wd_scale"]
        # Crops and masks are drawn for the global batch (from (seed, step)) and this rank keeps its
        # volumes' rows, so they do not depend on how the global batch is split over ranks; stochastic
        # depth draws from (seed, step, rank).
        generator = batch_generator(config.engine.seed, step)
        first, total, n_global = self.env.rank * hu.shape[0], self.env.world_size * hu.shape[0], config.augment.n_global
        global_rows = crop_major_rows(n_global, total, first, hu.shape[0])  # this rank's among the global batch's crops
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=step_generator(config.engine.seed, step, self.env.rank))))
        global_crops, local_crops = self.augment(hu.to(device, non_blocking=True), generator, first_volume=first,
                                                 global_batch=total)
        grid = config.model.grid_size

        with self.autocast:
            if config.method == "dino":
                masks = sample_ibot_masks(n_global * total, grid, config.ibot.mask_ratio, config.ibot.mask_probability,
                                          generator=generator, rows=global_rows)
                masked_index = masks.flatten().nonzero().squeeze(1)  # on the CPU: no device sync
                metrics = self.objective(self.student, self.teacher, global_crops, local_crops if len(local_crops) else None,
                                         masks.to(device, non_blocking=True), masked_index.to(device, non_blocking=True),
                                         values.teacher_temp, values.dino_weight)
            else:
                split = random_masking(n_global * total, math.prod(grid), config.mae.mask_ratio, generator=generator)
                split = MaskSplit(*(t[global_rows].to(device, non_blocking=True) for t in split))
                metrics = mae_objective(self.student, global_crops, split, config)
        metrics["loss"].backward()
        max_norm = config.optim.clip_grad if config.optim.clip_grad > 0 else math.inf
        for name, module in unwrap(self.student).clipped_modules().items():
            metrics[f"grad_norm_{name}"] = full_tensor(nn.utils.clip_grad_norm_(module.parameters(), max_norm))
        # After clipping, as DINOv2's frozen last layer still counts in the clip norm.
        if config.method == "dino" and values.freeze_last_layer:
            unwrap(self.student).cancel_last_layer_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            update_teacher(self.teacher, self.student, values.teacher_momentum)
        return metrics


    def evaluated_backbone(self) -> ViT3D:
        """The backbone that ``fmct pretrain`` exports: the teacher's for DINO, the student's for MAE."""
        return unwrap(self.teacher if self.teacher is not None else self.student).backbone


def compile_blocks(models: list[nn.Module | None]) -> None:
    """``torch.compile`` every transformer block of the models' backbones, in place.

    Block by block: the token counts differ between global and local crops, and the masked-patch
    gathers between blocks have data-dependent shapes that would break a whole-model graph.
    """
    for model in models:
        for block in model.backbone.blocks if model is not None else ():
            block.compile(dynamic=False)


# ---------------------------------------------------------------------------------------- the run
def pretrain(store: str | os.PathLike, run_dir: str | os.PathLike, config: PretrainConfig) -> dict:
    """Pretrain on every scan of ``store`` into ``run_dir``, resuming when it holds a checkpoint.

    Run by every process of a torchrun job (or alone). Returns, on every rank, ``{"step": completed
    steps, "total_steps", "rank", "student": unwrapped student, "teacher": unwrapped teacher or None,
    "last": the last logged metrics}``. Raises :class:`PretrainError` when a loss turns NaN or infinite
    (the last good checkpoint is kept), ``ConfigError`` when a resumed run's config differs in more than
    :data:`fmct.ssl.config.RESUMABLE_KEYS` or the store cannot fill a batch,
    :class:`fmct.ssl.checkpoint.TrainStateError` for an unusable checkpoint and ``FileNotFoundError``
    for a folder that is not a store.
    """
    env = init_distributed(config.engine.device)
    try:
        return _run(Path(store), Path(run_dir), config, env)
    finally:
        close_distributed()


def pretraining_scan_ids(store: Path, data: DataConfig) -> list[str] | None:
    """The store's scans minus those of ``data.exclude_sites`` (None: all of them)."""
    if not data.exclude_sites:
        return None
    from fmct.datasets import load_labels, match_to_store

    rows = Store(store).rows
    matched, _ = match_to_store(load_labels(data.labels), rows)
    excluded = {row["scan_id"] for row in matched if row.get("site") in data.exclude_sites}
    kept = [row["scan_id"] for row in rows if row["scan_id"] not in excluded]
    print(f"pretrain: {len(excluded)} scans of sites {', '.join(data.exclude_sites)} left out, {len(kept)} used",
          file=sys.stderr)
    return kept


def _run(store: Path, run_dir: Path, config: PretrainConfig, env: DistEnv) -> dict:
    engine, optim = config.engine, config.optim
    checkpoint_path = run_dir / CHECKPOINT_FILE
    resuming = checkpoint_path.exists()
    if resuming:
        check_resumable(run_dir, config)
    config_sha256 = config_digest(config)
    if env.is_main:
        save_config(config, run_dir / CONFIG_FILE)
    configure_torch(engine, env.device)

    try:
        dataset = StoreVolumes(store, pretraining_scan_ids(store, config.data))
    except ValueError as error:  # an empty store, or a labels file that does not fit it
        raise ConfigError(str(error)) from None
    if dataset.skipped and env.is_main:
        print(f"pretrain: {len(dataset.skipped)} scans of another grid left out, e.g. {dataset.skipped[0][0]}: "
              f"{dataset.skipped[0][1]}", file=sys.stderr)
    global_batch = optim.batch_size * env.world_size
    if len(dataset) < global_batch:
        raise ConfigError(f"{store}: {len(dataset)} usable scans do not fill one global batch of {global_batch} "
                          f"(optim.batch_size {optim.batch_size} x {env.world_size} processes)")
    schedules = Schedules(config, global_batch=global_batch)
    total_steps = schedules.total_steps

    trainer = Trainer(config, env, schedules)
    evaluator = _online_evaluator(config, store, env)
    state_parts = dict(student=trainer.student, optimizer=trainer.optimizer, teacher=trainer.teacher, centers=trainer.centers)
    step = load_checkpoint(checkpoint_path, **state_parts) if resuming else 0
    last_checkpoint = step if resuming else None
    if resuming and env.is_main and step < total_steps:
        print(f"pretrain: resuming {run_dir} from its checkpoint at step {step} of {total_steps}", file=sys.stderr)
    meta = {"config_sha256": config_sha256, "method": config.method, "world_size": env.world_size}
    export_extra = {"method": config.method, "store": str(store), "config_sha256": config_sha256,
                    "windows": [list(w) for w in config.augment.windows], "input_size": config.augment.global_size}

    monitor = Monitor(run_dir, env, engine, start_step=step, total_steps=total_steps, global_batch=global_batch,
                      steps_per_epoch=schedules.steps_per_epoch, n_prototypes=config.dino.n_prototypes,
                      teacher_warm_step=schedules.steps(config.dino.teacher_temp_warmup_epochs))
    loader = make_loader(dataset, optim.batch_size, workers=engine.workers, seed=engine.seed, rank=env.rank,
                         world_size=env.world_size, start_step=step, total_steps=total_steps)
    if evaluator is not None and step == 0:
        monitor.write({"step": 0, **evaluator(trainer.evaluated_backbone())})  # the random-init reference
    nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
    for hu, _ in loader:
        metrics = trainer.step(hu, step)
        nonfinite |= ~torch.isfinite(metrics["loss"].detach())
        step += 1
        monitor.add(metrics)
        stopping = step == engine.stop_at_step
        at_checkpoint = step % engine.checkpoint_every == 0 or step == total_steps or stopping
        at_evaluation = evaluator is not None and (step % config.online_eval.every == 0 or step == total_steps)
        if step % engine.log_every == 0 or at_checkpoint or at_evaluation:
            # Never write a checkpoint from weights that a non-finite loss has already spoilt.
            if bool(all_reduce_max(nonfinite.float())):
                kept = (f"last good checkpoint {checkpoint_path} (step {last_checkpoint}) kept" if last_checkpoint is not None
                        else "no checkpoint was written yet")
                raise PretrainError(f"loss became NaN or infinite by step {step} (this step: {describe_losses(metrics)}); "
                                    f"stopped; {kept}")
            online = evaluator(trainer.evaluated_backbone()) if at_evaluation else {}
            monitor.log(step, schedules.at(step - 1), online)
            if at_checkpoint:
                model_state = save_checkpoint(checkpoint_path, step=step, meta=meta, is_main=env.is_main, **state_parts)
                if env.is_main:
                    export_backbone(model_state, config, run_dir / BACKBONE_DIR, {**export_extra, "step": step})
                last_checkpoint = step
        if stopping:
            break
    monitor.close()
    if step >= total_steps and env.is_main and not monitor.logged_any:
        print(f"pretrain: {run_dir} is already complete ({step} of {total_steps} steps)", file=sys.stderr)
    teacher = unwrap(trainer.teacher) if trainer.teacher is not None else None
    return {"step": step, "total_steps": total_steps, "rank": env.rank, "student": unwrap(trainer.student),
            "teacher": teacher, "last": monitor.last}


def _online_evaluator(config: PretrainConfig, store: Path, env: DistEnv) -> OnlineEvaluator | None:
    """The online evaluator on the main process (the others never wait for it), or None."""
    if config.online_eval.every > 0 and env.world_size > 1 and config.engine.sharding == "fsdp":
        raise ConfigError("online_eval needs engine.sharding=ddp: an FSDP-sharded teacher cannot be probed on one rank")
    if not env.is_main:
        return None
    try:
        return build_online_evaluator(config, store, env.device)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"online_eval: {error}") from None


def describe_losses(metrics: dict[str, torch.Tensor]) -> str:
    """The loss terms of one step as text, e.g. ``loss nan, dino_loss 5.2, ...``."""
    return ", ".join(f"{name} {float(value.detach()):.4g}" for name, value in metrics.items() if name.endswith("loss"))


def configure_torch(engine: EngineConfig, device: torch.device) -> None:
    """TF32 on CUDA as configured; deterministic kernels when ``engine.deterministic``."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = engine.tf32
        torch.backends.cudnn.allow_tf32 = engine.tf32
    if engine.deterministic:
        # cuBLAS needs a fixed workspace for reproducible results; it reads this before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def export_backbone(model_state: dict, config: PretrainConfig, folder: Path, extra: dict) -> None:
    """Save the ``backbone.*`` weights of a full model state dict as an fmct model folder (hub format)."""
    with torch.device("meta"):
        backbone = ViT3D(config.model)
    prefix = "backbone."
    weights = {name[len(prefix):]: tensor for name, tensor in model_state.items() if name.startswith(prefix)}
    backbone.load_state_dict(weights, strict=True, assign=True)
    hub.save(backbone, folder, extra=extra)


# ------------------------------------------------------------------------------------- run folder
def config_digest(config: PretrainConfig) -> str:
    """SHA-256 of the config's fields that decide what a step computes (all but RESUMABLE_KEYS)."""
    flat = {key: value for key, value in _flatten(to_dict(config)).items() if key not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def check_resumable(run_dir: Path, config: PretrainConfig) -> None:
    """Raise ConfigError when ``config`` differs from the run's saved config beyond RESUMABLE_KEYS."""
    saved = _flatten(to_dict(load_config(PretrainConfig, run_dir / CONFIG_FILE)))
    current = _flatten(to_dict(config))
    changed = sorted(key for key in saved.keys() | current.keys()
                     if key not in RESUMABLE_KEYS and saved.get(key) != current.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:3])
        raise ConfigError(f"{run_dir / CONFIG_FILE}: cannot resume with a changed config ({details}); only "
                          f"{', '.join(RESUMABLE_KEYS)} may change; use a new --out folder for a new run")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ------------------------------------------------------------------------------------- monitoring
class Monitor:
    """log.jsonl lines, TensorBoard scalars (when installed), the progress bar and the collapse warning (rank 0).

    Metrics are kept as device tensors and averaged over the steps since the last line, so that only a
    logging step waits for the device; they are averaged over ranks too.
    """

    def __init__(self, run_dir: Path, env: DistEnv, engine: EngineConfig, start_step: int, total_steps: int,
                 global_batch: int, steps_per_epoch: int, n_prototypes: int, teacher_warm_step: int):
        self.env, self.global_batch, self.steps_per_epoch = env, global_batch, steps_per_epoch
        self.n_prototypes, self.teacher_warm_step = n_prototypes, teacher_warm_step
        self.path = run_dir / LOG_FILE
        self.sums: dict[str, torch.Tensor] = {}
        self.n_steps = 0
        self.last: dict[str, float] = {}
        self.logged_any = False
        self.warned_collapse = False
        self.clock = time.perf_counter()
        self.writer = None
        self.bar = None
        if env.is_main:
            self._drop_lines_after(start_step)
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            disable=not engine.progress or start_step >= total_steps)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
            except ImportError:  # TensorBoard is optional
                self.writer = None

    def _drop_lines_after(self, step: int) -> None:
        # A killed run may have logged steps after its last checkpoint, and a line cut short by the kill;
        # the resumed run logs those steps again.
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's metrics (0-d device tensors)."""
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.n_steps += 1

    def log(self, step: int, values: StepValues, online: dict[str, float] | None = None) -> None:
        """Write the line of ``step``: metrics averaged since the last line, the step's scheduled ``values``
        and the ``online`` evaluation's figures (rank 0 only) when there are any."""
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[name] for name in names]) / self.n_steps).tolist()
        now = time.perf_counter()
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), **dict(zip(names, means))}
        record.update(lr=values.lr, weight_decay=values.weight_decay, teacher_momentum=values.teacher_momentum,
                      teacher_temp=values.teacher_temp, volumes_per_s=self.n_steps * self.global_batch / (now - self.clock))
        if "teacher_entropy" not in record:  # MAE has no teacher
            for key in ("teacher_momentum", "teacher_temp"):
                record.pop(key)
        record.update(online or {})
        self.sums, self.n_steps, self.clock = {}, 0, now
        self.last, self.logged_any = record, True
        if not self.env.is_main:
            return
        self.write(record)
        reason = collapse_reason(record, self.n_prototypes, teacher_warm=step >= self.teacher_warm_step)
        if reason and not self.warned_collapse:
            self.warned_collapse = True
            tqdm.write(f"WARNING: pretrain step {step}: {reason}", file=sys.stderr)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, record: dict) -> None:
        """Append ``record`` (with its ``step``) to log.jsonl and TensorBoard (rank 0 only)."""
        if not self.env.is_main:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "epoch"):
                    self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> int | None:
    """The step of a log.jsonl line, None for a line that is not whole JSON (cut short by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
