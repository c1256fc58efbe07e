"""The pretraining config (``fmct pretrain``): model, augmentation, objectives, optimiser, engine.

Read with ``fmct.config.load_config(PretrainConfig, yaml_path, ["dino.n_prototypes=4096", ...])``.
It lives here rather than in :mod:`fmct.config` because its model and augmentation sections are defined
by :mod:`fmct.models` and :mod:`fmct.data`, which themselves import :mod:`fmct.config`.

Run length and every schedule are counted in epochs of ``optim.epoch_length`` steps (DINOv2's fixed
1,250 iterations), never in passes over the store: a warm-up then lasts the same number of optimiser
steps on a store of 150 scans as on one of 300,000. Every schedule is a function of the global step, so
a resumed run continues each schedule exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmct.data.augment import AugmentConfig
from fmct.errors import ConfigError
from fmct.models.vit3d import ViT3DConfig

METHODS = ("dino", "mae", "anomaly")
CENTERINGS = ("sinkhorn_knopp", "ema")
SHARDINGS = ("ddp", "fsdp")

# Keys that may differ when a run is resumed: they change how long it runs or how it reports, never
# what one step computes. (Changing optim.epochs stretches the cosine schedules from the resumed step on.)
RESUMABLE_KEYS = (
    "optim.epochs",
    "online_eval.every",
    "online_eval.store",
    "online_eval.labels",
    "online_eval.findings",
    "online_eval.max_scans",
    "online_eval.knn_k",
    "data.shards_url",  # where the shards are read from, not what they hold
    "engine.checkpoint_every",
    "engine.stop_at_step",
    "engine.log_every",
    "engine.workers",
    "engine.progress",
    # How the DINO and iBOT losses are cut into chunks: the same values, only float additions reordered.
    "dino.chunk_size",
    "ibot.chunk_rows",
)


@dataclass
class DINOConfig:
    """DINO self-distillation on CLS tokens across multi-crop (DINOv2's values by default)."""

    loss_weight: float = 1.0
    # The DINO term is off (weight 0) for this long while iBOT and KoLeo make the CLS depend on the scan:
    # from a fresh ViT, whose CLS is nearly the same for every scan, Sinkhorn-Knopp turns identical
    # teacher rows into uniform targets and the head learns to ignore its input (fmct's FINDINGS).
    start_epochs: float = 0.0
    n_prototypes: int = 65536  # 65536 for ViT-B as in FM-CT / DINOv2; a few thousand for tiny models
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_n_layers: int = 3
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04  # warmed up linearly to teacher_temp, then held
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    centering: str = "sinkhorn_knopp"  # or "ema" (DINO's centre, momentum below)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    freeze_last_layer_epochs: float = 1.0  # prototypes get no update for this long
    # Images per chunk of the DINO loss, each chunk recomputed in the backward pass (fmct.ssl.chunked):
    # the same loss and gradients with less memory; 0: the whole batch at once.
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ConfigError(f"centering must be one of {', '.join(CENTERINGS)}, got {self.centering!r}")
        if (
            self.n_prototypes < 1
            or self.head_n_layers < 1
            or min(self.student_temp, self.teacher_temp, self.teacher_temp_start) <= 0
        ):
            raise ConfigError("n_prototypes and head_n_layers must be >= 1 and the temperatures > 0")
        if self.chunk_size < 0:
            raise ConfigError("chunk_size must be >= 0 (0: no chunks)")


@dataclass
class IBOTConfig:
    """iBOT masked-patch distillation on the global crops."""

    loss_weight: float = 1.0
    separate_head: bool = False  # False: the DINO head also scores the patch tokens
    n_prototypes: int = 65536  # only for a separate head
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # share of a crop's patches masked, drawn per crop
    mask_probability: float = 0.5  # share of global crops that are masked at all
    # Masked tokens per chunk of the iBOT loss, each chunk recomputed in the backward pass: the same loss
    # and gradients, with the (tokens, prototypes) fp32 intermediates of one chunk (at ViT-B batch 64,
    # ~10,000 masked tokens x 65,536 prototypes: 2.6 GB per such tensor); 0: all at once.
    chunk_rows: int = 1024

    def __post_init__(self) -> None:
        low, high = self.mask_ratio
        if not (0 <= low <= high <= 1 and 0 <= self.mask_probability <= 1):
            raise ConfigError(
                "mask_ratio must be (low, high) with 0 <= low <= high <= 1 and mask_probability in [0, 1]"
            )
        if self.chunk_rows < 0:
            raise ConfigError("chunk_rows must be >= 0 (0: no chunks)")


@dataclass
class KoLeoConfig:
    loss_weight: float = 0.1  # KoLeo on the student CLS of each global crop


@dataclass
class MAEConfig:
    """Masked autoencoding on the global crops (``method: mae``)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    norm_pix: bool = True  # each target patch standardised to mean 0, variance 1

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")


@dataclass
class AnomalyConfig:
    """Synthetic-anomaly pretraining (``method: anomaly``, :mod:`fmct.ssl.anomaly`): smooth ellipsoids
    of added density painted into soft tissue inside the head, found again per patch and per scan."""

    probability: float = 0.5  # share of volumes that get changes (the rest are the negatives)
    max_changes: int = 3  # a changed volume gets 1 .. max_changes of them
    semi_axis_mm: tuple[float, float] = (3.0, 21.0)  # each semi-axis drawn uniformly in this range
    delta_hu: tuple[float, float] = (8.0, 50.0)  # the offset's magnitude, drawn uniformly
    hyperdense_share: float = 0.6  # share of changes that add density (the rest remove it)
    edge_softness: tuple[float, float] = (0.05, 0.3)  # edge width as a fraction of the normalised radius
    edge_roughness: float = 0.15  # std of the noise added to the normalised radius, per voxel
    air_margin_mm: float = 9.0  # changes keep this far from air: inside the head, off the scalp
    visible_hu: float = 15.0  # a change of this many HU or more counts as fully visible in the targets
    scan_loss_weight: float = 1.0  # weight of the per-scan term beside the per-patch one
    # True: the heads learn a hyperdense change and a hypodense one apart (two logits per patch and per
    # scan, model.change_kinds 2); False: any change, one logit each.
    signed: bool = False

    @property
    def kinds(self) -> int:
        """How many kinds of change the targets and heads tell apart: 2 (hyperdense, hypodense) when
        ``signed``, else 1."""
        return 2 if self.signed else 1

    def __post_init__(self) -> None:
        ranges = (self.semi_axis_mm, self.delta_hu, self.edge_softness)
        if not all(0 < low <= high for low, high in ranges):
            raise ConfigError("semi_axis_mm, delta_hu and edge_softness must be (low, high) with 0 < low <= high")
        if not (0 <= self.probability <= 1 and 0 <= self.hyperdense_share <= 1 and self.max_changes >= 1):
            raise ConfigError("probability and hyperdense_share must lie in [0, 1] and max_changes be >= 1")
        if min(self.edge_roughness, self.air_margin_mm, self.scan_loss_weight) < 0 or self.visible_hu <= 0:
            raise ConfigError("edge_roughness, air_margin_mm and scan_loss_weight must be >= 0, visible_hu > 0")


@dataclass
class OptimConfig:
    """AdamW and its schedules. Learning rate = base_lr * sqrt(global_batch / 1024), warmed up, then cosine."""

    batch_size: int = 64  # volumes per rank and step
    epoch_length: int = 1250  # optimiser steps per "epoch" of every schedule (DINOv2's OFFICIAL_EPOCH_LENGTH)
    epochs: float = 100.0  # run length: epochs * epoch_length steps
    warmup_epochs: float = 10.0
    base_lr: float = 4e-3  # for a global batch of 1024 (square-root scaling, as in DINOv2)
    min_lr: float = 1e-6
    weight_decay: float = 0.04  # cosine to weight_decay_end
    weight_decay_end: float = 0.2
    layer_decay: float = 0.9  # block i's LR scale is layer_decay ** (depth + 1 - (i + 1))
    patch_embed_lr_mult: float = 0.2  # extra LR scale of the patch embedding (DINOv2)
    clip_grad: float = 3.0  # max gradient L2 norm of each module (backbone, DINO head, iBOT head); 0: off
    betas: tuple[float, float] = (0.9, 0.999)
    teacher_momentum: float = 0.992  # EMA momentum, cosine to teacher_momentum_end
    teacher_momentum_end: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs <= 0 or self.epoch_length < 1:
            raise ConfigError("batch_size and epoch_length must be >= 1 and epochs > 0")


@dataclass
class EngineConfig:
    """Where and how the steps run. The same code runs on a CPU (fp32) and CUDA (bf16 autocast)."""

    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    seed: int = 0
    workers: int = 4  # loader processes per rank (they only read int16 bytes)
    bf16: bool = True  # bf16 autocast on CUDA; a CPU always computes in fp32
    tf32: bool = True  # TF32 matmuls for the fp32 parts on CUDA
    compile: bool = False  # torch.compile each transformer block
    sharding: str = "ddp"  # multi-process: "ddp" (replicated) or "fsdp" (FSDP2 fully_shard, large models)
    deterministic: bool = False  # deterministic kernels (bit-exact resume on CPU)
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    # Stop after this global step with a checkpoint (0: run to the end), e.g. to fit a job's time limit;
    # the same command without it resumes the run on the same schedules.
    stop_at_step: int = 0
    log_every: int = 10  # steps between log.jsonl lines
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.stop_at_step < 0:
            raise ConfigError("checkpoint_every and log_every must be >= 1 step and stop_at_step >= 0")


@dataclass
class DataConfig:
    """Which scans of the store to pretrain on. Of a labels file only the site column is read.

    ``--store`` may also name a shard folder (``fmct store pack``, :mod:`fmct.data.shards`): every
    packed scan is used, streamed in the order of (seed, epoch, rank).
    """

    labels: str = ""  # a labels CSV (or cq500:/rsna: spec) giving each scan's site
    # Sites kept out of pretraining, so that a held-out site stays unseen for an out-of-distribution test.
    exclude_sites: tuple[str, ...] = ()
    # Shards only. Where they are read from: a URL template with {shard}, e.g. "pipe:aws s3 cp
    # s3://bucket/shards/{shard} -"; empty: the files beside the index.
    shards_url: str = ""
    shuffle_shards: int = 4  # shards whose scans are shuffled together (held in memory, compressed)

    def __post_init__(self) -> None:
        if self.exclude_sites and not self.labels:
            raise ConfigError("exclude_sites needs labels, the file that gives each scan's site")


@dataclass
class OnlineEvalConfig:
    """Probe the teacher during pretraining (:mod:`fmct.ssl.online_eval`): k-NN and linear AUROC on a
    labelled validation subset (never its test split), RankMe and the teacher's statistics in log.jsonl."""

    every: int = 0  # steps between evaluations (and one before the first step); 0: off
    store: str = ""  # labelled store; empty: the pretraining store
    labels: str = ""  # labels CSV (or cq500:/rsna: spec) of that store; empty: RankMe only
    findings: tuple[str, ...] = ()  # empty: every finding with enough positives
    max_scans: int = 256  # held in memory as int16
    knn_k: int = 20

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_scans < 1 or self.knn_k < 1:
            raise ConfigError("every must be >= 0 (0: off), max_scans and knn_k >= 1")


@dataclass
class PretrainConfig:
    """Everything ``fmct pretrain`` needs besides the store; written resolved to RUN/config.yaml."""

    method: str = "dino"  # "dino" (DINO + iBOT + KoLeo), "mae" or "anomaly" (synthetic changes found again)
    data: DataConfig = field(default_factory=DataConfig)
    model: ViT3DConfig = field(default_factory=ViT3DConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    koleo: KoLeoConfig = field(default_factory=KoLeoConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    online_eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)

    def __post_init__(self) -> None:
        """Checks across sections; each section checks its own fields."""
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        model, augment = self.model, self.augment
        model.change_heads = self.method == "anomaly"  # the anomaly pretext's heads stay with its backbone
        model.change_kinds = self.anomaly.kinds if model.change_heads else 1
        if tuple(model.img_size) != (augment.global_size,) * 3:
            raise ConfigError(
                f"model.img_size {list(model.img_size)} must be the global crop size "
                f"{[augment.global_size] * 3} (augment.global_size): the position embedding is learned for it"
            )
        for name, size in (("global_size", augment.global_size), ("local_size", augment.local_size)):
            if any(size % p for p in model.patch_size):
                raise ConfigError(
                    f"augment.{name} {size} is not a multiple of model.patch_size {list(model.patch_size)}"
                )
        if model.in_chans != len(augment.windows):
            raise ConfigError(
                f"model.in_chans {model.in_chans} must equal the number of augment.windows ({len(augment.windows)})"
            )
        if self.method == "anomaly" and augment.n_local:
            raise ConfigError("method anomaly reads the global crops only: set augment.n_local=0")
        if self.method == "dino" and self.koleo.loss_weight > 0 and self.optim.batch_size < 2:
            raise ConfigError(
                "KoLeo needs optim.batch_size >= 2 (nearest neighbours within a batch); or set koleo.loss_weight=0"
            )
