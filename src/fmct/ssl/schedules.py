"""Training schedules as pure functions of the global step (so a resumed run picks each one up exactly).

Conventions: ``step`` counts optimiser steps from 0; ``total_steps`` is the run length. A cosine runs
from its start value at its first step to exactly its end value at ``total_steps`` (and stays there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmct.ssl.config import PretrainConfig


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and after)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, end: float, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then a cosine from ``peak`` to ``end``."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step ``warmup_steps``), then constant."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


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
            teacher_temp=linear_warmup(step, self.steps(dino.teacher_temp_warmup_epochs), dino.teacher_temp_start,
                                       dino.teacher_temp),
            freeze_last_layer=step < self.steps(dino.freeze_last_layer_epochs),
            dino_weight=dino.loss_weight if step >= self.steps(dino.start_epochs) else 0.0,
        )
