"""Schedules of a pretraining run: values at the start, at the end of warm-up and at the end."""

import math

import pytest

from fmct.config import load_config
from fmct.schedules import cosine, linear_warmup, warmup_cosine
from fmct.ssl.config import PretrainConfig
from fmct.ssl.schedules import Schedules


def test_cosine_and_warmup_shapes():
    assert cosine(0, 100, 0.04, 0.2) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.2) == pytest.approx(0.12)  # half-way is the mean
    assert cosine(100, 100, 0.04, 0.2) == pytest.approx(0.2)
    assert cosine(250, 100, 0.04, 0.2) == pytest.approx(0.2)  # held after the end
    assert warmup_cosine(0, 100, 10, peak=1.0, end=0.0) == 0.0
    assert warmup_cosine(5, 100, 10, peak=1.0, end=0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, peak=1.0, end=0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, peak=1.0, end=0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, peak=1.0, end=0.0) == pytest.approx(0.0)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == linear_warmup(90, 30, 0.04, 0.07) == 0.07


def test_run_schedules_follow_the_recipe():
    # 100 epochs of 10 steps at a global batch of 256: DINOv2's shapes, FM-CT-like values.
    config = load_config(
        PretrainConfig,
        None,
        [
            "optim.epochs=100",
            "optim.epoch_length=10",
            "optim.warmup_epochs=10",
            "optim.base_lr=0.004",
            "optim.min_lr=1e-6",
            "dino.teacher_temp_warmup_epochs=30",
        ],
    )
    schedules = Schedules(config, global_batch=256)
    assert schedules.total_steps == 1000
    assert schedules.peak_lr == pytest.approx(0.002)  # square-root scaling: 4e-3 * sqrt(256 / 1024)

    start, warm, end = schedules.at(0), schedules.at(100), schedules.at(1000)
    assert start.lr == 0.0 and warm.lr == pytest.approx(2e-3) and end.lr == pytest.approx(1e-6)
    assert schedules.at(50).lr == pytest.approx(1e-3)
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.2)
    assert schedules.at(500).weight_decay == pytest.approx(0.12)
    assert start.teacher_momentum == pytest.approx(0.992) and end.teacher_momentum == pytest.approx(1.0)
    assert schedules.at(500).teacher_momentum == pytest.approx(0.996)
    assert start.teacher_temp == pytest.approx(0.04) and schedules.at(150).teacher_temp == pytest.approx(0.055)
    assert schedules.at(300).teacher_temp == pytest.approx(0.07) and end.teacher_temp == pytest.approx(0.07)
    # Prototypes frozen for exactly the first epoch (steps 0..9).
    assert schedules.at(9).freeze_last_layer and not schedules.at(10).freeze_last_layer
    # Monotone where they should be.
    lrs = [schedules.at(s).lr for s in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert not math.isnan(schedules.at(10_000).lr)


def test_an_epoch_is_a_fixed_number_of_steps_whatever_the_store():
    # DINOv2 counts its schedules in epochs of 1,250 iterations; a small store must not shrink a warm-up.
    config = load_config(PretrainConfig, None, ["optim.epochs=2", "optim.warmup_epochs=1"])
    schedules = Schedules(config, global_batch=64)
    assert schedules.steps_per_epoch == 1250 and schedules.total_steps == 2500
    assert schedules.at(625).lr == pytest.approx(0.5 * 4e-3 * math.sqrt(64 / 1024))  # half-way through warm-up
    assert schedules.at(1249).freeze_last_layer and not schedules.at(1250).freeze_last_layer


def test_the_dino_term_starts_after_its_start_epochs():
    config = load_config(PretrainConfig, None, ["optim.epoch_length=10", "dino.start_epochs=2", "dino.loss_weight=0.5"])
    schedules = Schedules(config, global_batch=16)
    assert schedules.at(0).dino_weight == schedules.at(19).dino_weight == 0.0
    assert schedules.at(20).dino_weight == 0.5 and schedules.at(500).dino_weight == 0.5
