"""The schedules of a pretraining run (LR, weight decay, teacher momentum and temperature, the DINO
term's start, the frozen last layer), each a pure function of the global step built on the curves of
:mod:`fmct.schedules`, so a resumed run picks each one up exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmct.schedules import cosine, linear_warmup, warmup_cosine
from fmct.ssl.config import PretrainConfig


@dataclass(frozen=True)
class StepValues:
    """What the schedules say for one step."""

    lr: float  # peak-scaled learning rate before the per-layer lr_scale
    weight_decay: float  # before the per-parameter wd_scale (0 for norms, biases, tokens)
    teacher_momentum: float  # EMA: teacher <- m * teacher + (1 - m) * student
    teacher_temp: float
    freeze_last_layer: bool  # DINO prototypes get no update at this step
    dino_weight: float  # weight of the DINO (CLS) term: 0 until dino.start_epochs, then dino.loss_weight


@dataclass(frozen=True)
class Schedules:
    """All schedules of a pretraining run, built from its config and its global batch (volumes per step).

    An epoch is ``config.optim.epoch_length`` steps, whatever the size of the store.
    """

    config: PretrainConfig
    global_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return self.config.optim.epoch_length

    @property
    def total_steps(self) -> int:
        return max(1, round(self.config.optim.epochs * self.steps_per_epoch))

    def steps(self, epochs: float) -> int:
        """``epochs`` as a whole number of steps."""
        return round(epochs * self.steps_per_epoch)

    @property
    def peak_lr(self) -> float:
        """DINOv2's square-root scaling rule: base_lr is the learning rate for a global batch of 1024 volumes."""
        return self.config.optim.base_lr * math.sqrt(self.global_batch / 1024)

    def at(self, step: int) -> StepValues:
        """Every scheduled value at global step ``step``."""
        optim, dino = self.config.optim, self.config.dino
        total = self.total_steps
        return StepValues(
            lr=warmup_cosine(step, total, self.steps(optim.warmup_epochs), self.peak_lr, optim.min_lr),
            weight_decay=cosine(step, total, optim.weight_decay, optim.weight_decay_end),
            teacher_momentum=cosine(step, total, optim.teacher_momentum, optim.teacher_momentum_end),
            teacher_temp=linear_warmup(
                step, self.steps(dino.teacher_temp_warmup_epochs), dino.teacher_temp_start, dino.teacher_temp
            ),
            freeze_last_layer=step < self.steps(dino.freeze_last_layer_epochs),
            dino_weight=dino.loss_weight if step >= self.steps(dino.start_epochs) else 0.0,
        )
