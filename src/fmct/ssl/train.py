"""Self-supervised pretraining of a :class:`~fmct.models.ViT3D` on the store: DINO + iBOT + KoLeo
(DINOv2's formulation), MAE or synthetic anomalies found again. ``fmct pretrain`` calls :func:`pretrain`.

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

An MAE step encodes the visible 25% of each global crop's patches and reconstructs the rest. An anomaly
step paints synthetic changes into the HU batch before step 2 (the crops carry their map along) and
learns where they are, per patch and per crop (:mod:`fmct.ssl.anomaly`).

The models and the methods' losses are :mod:`fmct.ssl.meta_arch`'s; what the run folder holds is
:mod:`fmct.ssl.run_folder`'s; what the run shows, :mod:`fmct.ssl.monitor`'s. Run again on the same
folder, the job resumes from the checkpoint and reaches the weights of a run that never stopped.
"""

from __future__ import annotations

import gc
import math
import os
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from fmct.config import save_config
from fmct.data import MultiCropAugment, StoreVolumes, batch_generator, crop_major_rows, make_loader, step_generator
from fmct.data.shards import ShardVolumes, is_shard_folder
from fmct.devices import autocast, unwrap
from fmct.distributed import DistEnv, all_reduce_max, close_distributed, init_distributed
from fmct.errors import ConfigError, InputError, PretrainError
from fmct.log import logger
from fmct.models import ViT3D
from fmct.ssl.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from fmct.ssl.config import DataConfig, EngineConfig, PretrainConfig
from fmct.ssl.distributed import full_tensor, whole_copy, wrap_student, wrap_teacher
from fmct.ssl.meta_arch import build_method, update_teacher
from fmct.ssl.monitor import Monitor
from fmct.ssl.online_eval import OnlineEvaluator, build_online_evaluator
from fmct.ssl.run_folder import BACKBONE_DIR, CONFIG_FILE, check_resumable, config_digest, export_backbone
from fmct.ssl.schedules import Schedules
from fmct.store import Store, store_identity


# ------------------------------------------------------------------------------------------ optimizer
def build_optimizer(model: nn.Module, config: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s groups (layer-wise LR scale, no decay on norms/biases/tokens), fused on CUDA."""
    optim = config.optim
    groups = unwrap(model).param_groups(optim.weight_decay, optim.layer_decay, optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, fused=device.type == "cuda")


# --------------------------------------------------------------------------------------- one step
class Trainer:
    """The student, teacher, optimizer and objective of a run on one process, and its training step.

    Built from a seed that is the same on every rank, so that all replicas start from identical
    weights; wrapped for DDP or FSDP2 when the process is part of a torchrun job.
    """

    def __init__(self, config: PretrainConfig, env: DistEnv, schedules: Schedules, spacing_mm: float | None = None):
        """``spacing_mm``: the store's voxel size, for a method that paints in mm (``anomaly``)."""
        self.config, self.env, self.schedules, self.spacing_mm = config, env, schedules, spacing_mm
        engine = config.engine
        torch.manual_seed(engine.seed)
        self.method = build_method(config, env.device)
        student = self.method.build_model().to(env.device)
        teacher = deepcopy(student).eval().requires_grad_(False) if self.method.has_teacher else None
        if engine.compile:
            compile_blocks([student, teacher])
        self.student = wrap_student(student, env, engine.sharding).train()
        self.teacher = wrap_teacher(teacher, env, engine.sharding) if teacher is not None else None
        self.optimizer = build_optimizer(self.student, config, env.device)
        self.centers = self.method.centers
        self.augment = MultiCropAugment(config.augment)
        self.autocast = autocast(env.device, engine.bf16)

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
        first, total = self.env.rank * hu.shape[0], self.env.world_size * hu.shape[0]
        n_crops = config.augment.n_global * total  # global crops of the whole global batch
        global_rows = crop_major_rows(config.augment.n_global, total, first, hu.shape[0])  # this rank's among them
        torch.manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=step_generator(config.engine.seed, step, self.env.rank)))
        )
        hu, maps = self.method.paint(hu.to(device, non_blocking=True), self.spacing_mm, generator, first, total)
        views = self.augment(hu, generator, first_volume=first, global_batch=total, maps=maps)
        global_crops, local_crops = views[:2]
        global_maps = views[2] if maps is not None else None
        with self.autocast:
            metrics = self.method.loss(
                self.student,
                self.teacher,
                global_crops,
                local_crops,
                global_maps,
                generator,
                values,
                global_rows,
                n_crops,
            )
        metrics["loss"].backward()
        max_norm = config.optim.clip_grad if config.optim.clip_grad > 0 else math.inf
        for name, parameters in unwrap(self.student).clipped_parameters().items():
            metrics[f"grad_norm_{name}"] = full_tensor(nn.utils.clip_grad_norm_(parameters, max_norm))
        self.method.after_clipping(unwrap(self.student), values)
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
    steps, "total_steps", "rank", "student": the student, "teacher": the teacher or None (plain modules
    with the whole weights on every rank, also after FSDP2),
    "last": the last logged metrics}``. Raises :class:`PretrainError` when a loss turns NaN or infinite
    (the last good checkpoint is kept), ``ConfigError`` when a resumed run's config differs in more than
    :data:`fmct.ssl.config.RESUMABLE_KEYS` or the store cannot fill a batch,
    :class:`fmct.errors.TrainStateError` for an unusable checkpoint and :class:`fmct.errors.InputError`
    for a folder that is not a store.
    """
    env = init_distributed(config.engine.device)
    try:
        return _run(Path(store), Path(run_dir), config, env)
    finally:
        gc.collect()  # FSDP2's modules hold the process group in reference cycles: free them while it lives
        close_distributed()


def pretraining_volumes(store: Path, data: DataConfig) -> StoreVolumes | ShardVolumes:
    """The volumes to pretrain on: a store's (minus ``data.exclude_sites``) or a shard folder's."""
    if not is_shard_folder(store):
        return StoreVolumes(store, pretraining_scan_ids(store, data))
    if data.exclude_sites:
        raise ConfigError(
            f"{store}: a shard folder holds no sources to match labels to; pretrain from the store "
            f"to leave out data.exclude_sites"
        )
    return ShardVolumes(store, data.shards_url, data.shuffle_shards)


def pretraining_scan_ids(store: Path, data: DataConfig) -> list[str] | None:
    """The store's scans minus those of ``data.exclude_sites`` (None: all of them)."""
    if not data.exclude_sites:
        return None
    from fmct.datasets import load_labels, match_to_store

    rows = Store(store).rows
    matched, _ = match_to_store(load_labels(data.labels), rows)
    excluded = {row["scan_id"] for row in matched if row.get("site") in data.exclude_sites}
    kept = [row["scan_id"] for row in rows if row["scan_id"] not in excluded]
    logger.info(f"pretrain: {len(excluded)} scans of sites {', '.join(data.exclude_sites)} left out, {len(kept)} used")
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
        dataset = pretraining_volumes(store, config.data)
    except InputError as error:  # an empty store, a labels file that does not fit it, a bad shard index
        raise ConfigError(str(error)) from None
    if dataset.skipped and env.is_main:
        logger.warning(
            f"pretrain: {len(dataset.skipped)} scans of another grid left out, e.g. {dataset.skipped[0][0]}: "
            f"{dataset.skipped[0][1]}"
        )
    global_batch = optim.batch_size * env.world_size
    if len(dataset) < global_batch:
        raise ConfigError(
            f"{store}: {len(dataset)} usable scans do not fill one global batch of {global_batch} "
            f"(optim.batch_size {optim.batch_size} x {env.world_size} processes)"
        )
    schedules = Schedules(config, global_batch=global_batch)
    total_steps = schedules.total_steps

    trainer = Trainer(config, env, schedules, dataset.spacing_mm)
    evaluator = _online_evaluator(config, store, env)
    state_parts = dict(
        student=trainer.student, optimizer=trainer.optimizer, teacher=trainer.teacher, centers=trainer.centers
    )
    step = load_checkpoint(checkpoint_path, **state_parts) if resuming else 0
    last_checkpoint = step if resuming else None
    if resuming and env.is_main and step < total_steps:
        logger.info(f"pretrain: resuming {run_dir} from its checkpoint at step {step} of {total_steps}")
    meta = {"config_sha256": config_sha256, "method": config.method, "world_size": env.world_size}
    export_extra = {
        "method": config.method,
        "store": store_identity(store),
        "config_sha256": config_sha256,
        "windows": [list(w) for w in config.augment.windows],
        "input_size": config.augment.global_size,
    }

    monitor = Monitor(
        run_dir,
        env,
        engine,
        start_step=step,
        total_steps=total_steps,
        global_batch=global_batch,
        steps_per_epoch=schedules.steps_per_epoch,
        n_prototypes=config.dino.n_prototypes,
        teacher_warm_step=schedules.steps(config.dino.teacher_temp_warmup_epochs),
    )
    order = dict(
        workers=engine.workers,
        seed=engine.seed,
        rank=env.rank,
        world_size=env.world_size,
        start_step=step,
        total_steps=total_steps,
    )
    if isinstance(dataset, ShardVolumes):
        loader = dataset.batches(optim.batch_size, **order)
    else:
        loader = make_loader(dataset, optim.batch_size, **order)
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
                kept = (
                    f"last good checkpoint {checkpoint_path} (step {last_checkpoint}) kept"
                    if last_checkpoint is not None
                    else "no checkpoint was written yet"
                )
                raise PretrainError(
                    f"loss became NaN or infinite by step {step} (this step: {describe_losses(metrics)}); "
                    f"stopped; {kept}"
                )
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
        logger.info(f"pretrain: {run_dir} is already complete ({step} of {total_steps} steps)")
    build = trainer.method.build_model
    return {
        "step": step,
        "total_steps": total_steps,
        "rank": env.rank,
        "student": whole_copy(trainer.student, build),
        "teacher": whole_copy(trainer.teacher, build) if trainer.teacher is not None else None,
        "last": monitor.last,
    }


def _online_evaluator(config: PretrainConfig, store: Path, env: DistEnv) -> OnlineEvaluator | None:
    """The online evaluator on the main process (the others never wait for it), or None."""
    if config.online_eval.every > 0 and env.world_size > 1 and config.engine.sharding == "fsdp":
        raise ConfigError("online_eval needs engine.sharding=ddp: an FSDP-sharded teacher cannot be probed on one rank")
    if not env.is_main:
        return None
    try:
        return build_online_evaluator(config, store, env.device)
    except InputError as error:
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
