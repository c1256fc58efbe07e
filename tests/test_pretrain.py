"""Pretraining engine: loss wiring, EMA, masks, exact resume after SIGKILL, DDP on two processes, NaN stop,
MAE, config checks, collapse warning, and (slow) a short run whose loss falls."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

import fmct.ssl.meta_arch as meta_arch
import fmct.ssl.train as train
from fmct import hub
from fmct.cli import main
from fmct.config import load_config
from fmct.data import sample_ibot_masks
from fmct.errors import ConfigError
from fmct.ssl.checkpoint import read_checkpoint
from fmct.ssl.collapse import collapse_reason, teacher_statistics
from fmct.ssl.config import PretrainConfig
from fmct.ssl.meta_arch import DINOMethod, DINOModel, update_teacher
from fmct.ssl.monitor import Monitor
from fmct.ssl.train import pretrain
from fmct.store import rebuild_tables, write_scan

torch.set_num_threads(1)

# Depth 2, width 64, 32^3 global crops and 16^3 local crops with patch 8 (64 and 8 tokens), 256 prototypes.
TINY = [
    "model.size=tiny",
    "model.depth=2",
    "model.embed_dim=64",
    "model.n_heads=2",
    "model.img_size=32",
    "model.patch_size=8",
    "model.n_registers=1",
    "augment.global_size=32",
    "augment.local_size=16",
    "augment.n_local=2",
    "dino.n_prototypes=256",
    "dino.head_hidden_dim=128",
    "dino.head_bottleneck_dim=32",
    "dino.teacher_temp_warmup_epochs=1",
    "optim.batch_size=2",
    "optim.epoch_length=4",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.base_lr=0.05",
    "optim.layer_decay=1.0",
    "engine.device=cpu",
    "engine.workers=0",
    "engine.progress=false",
    "engine.log_every=1",
    "engine.checkpoint_every=4",
]


def make_store(path: Path, n: int = 8, size: int = 48, seed: int = 0) -> Path:
    """``n`` int16 head phantoms of ``size``^3: skull 1200 HU, brain 35 HU with its own smooth texture
    (+-10 HU, so that every crop of a scan shows which scan it is), a 70 HU bleed of random size and place."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    for i in range(n):
        radius = np.sqrt(sum((a / r) ** 2 for a, r in zip(axes, rng.uniform(0.7, 0.9, 3))))
        texture = gaussian_filter(rng.normal(size=(size,) * 3), sigma=rng.uniform(1.5, 4.0))
        hu = np.full((size,) * 3, -1000, np.int16)
        hu[radius < 0.95] = 1200
        brain = radius < 0.85
        hu[brain] = np.round(35 + 10 * texture[brain] / texture.std())
        centre = rng.uniform(-0.4, 0.4, 3)
        hu[sum((a - c) ** 2 for a, c in zip(axes, centre)) < rng.uniform(0.01, 0.06)] = 70
        write_scan(path, hu, {"scan_id": f"scan{i:03d}", "store_shape": [size] * 3, "store_spacing_mm": [4.0] * 3})
    rebuild_tables(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def tiny_config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, TINY + list(overrides))


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def cli_command(store: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fmct.cli", "pretrain", "--store", str(store), "--out", str(run), *TINY, *overrides]


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------- loss wiring
@pytest.mark.parametrize("separate_head", [False, True])
def test_objective_wires_dino_ibot_koleo_and_the_ema_is_exact(separate_head):
    config = tiny_config("dino.centering=ema", f"ibot.separate_head={separate_head}", "ibot.n_prototypes=128")
    torch.manual_seed(0)
    student = DINOModel(config)
    teacher = DINOModel(config).eval()
    method = DINOMethod(config, torch.device("cpu"))
    global_crops, local_crops = torch.rand(4, 3, 32, 32, 32), torch.rand(4, 3, 16, 16, 16)
    masks = sample_ibot_masks(4, (4, 4, 4), (0.1, 0.5), 0.5, generator=torch.Generator().manual_seed(0))
    masked_index = masks.flatten().nonzero().squeeze(1)
    metrics = method.objective(
        student, teacher, global_crops, local_crops, masks, masked_index, teacher_temp=0.04, dino_weight=1.0
    )
    terms = {name: float(metrics[name].detach()) for name in ("loss", "dino_loss", "ibot_loss", "koleo_loss")}
    assert all(np.isfinite(v) for v in terms.values()), terms
    assert terms["loss"] == pytest.approx(terms["dino_loss"] + terms["ibot_loss"] + 0.1 * terms["koleo_loss"], rel=1e-6)
    # Cross-entropies against 256 prototypes: positive, at most about ln 256 + the logit spread.
    assert 0 < terms["dino_loss"] < 20 and 0 < terms["ibot_loss"] < 20
    # The EMA centres moved off zero towards the teacher's mean logits (momentum 0.9).
    assert float(method.centers["dino"].center.abs().max()) > 0
    assert method.centers["ibot"].center.shape == (1, 128 if separate_head else 256)
    assert (student.ibot_head is not None) == separate_head
    # Without masked crops the iBOT term is exactly 0.
    none = torch.zeros_like(masks)
    metrics = method.objective(
        student,
        teacher,
        global_crops,
        None,
        none,
        none.flatten().nonzero().squeeze(1),
        teacher_temp=0.04,
        dino_weight=1.0,
    )
    assert float(metrics["ibot_loss"].detach()) == 0.0 and float(metrics["dino_loss"].detach()) > 0

    # Optimizer groups name each parameter as the model (and so the checkpoint) does.
    optimizer = train.build_optimizer(student, config, torch.device("cpu"))
    named = {id(p): name for name, p in student.named_parameters()}
    for group in optimizer.param_groups:
        assert group["names"] == [named[id(p)] for p in group["params"]]
    assert len(named) == sum(len(g["params"]) for g in optimizer.param_groups)

    metrics["loss"].backward()
    assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())
    update_teacher(teacher, student, momentum=0.9)
    for name, p in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        torch.testing.assert_close(dict(teacher.named_parameters())[name], expected, rtol=0, atol=1e-7)


def test_a_tiny_run_logs_every_term_and_exports_the_teacher(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    masks_seen = []

    def recording_masks(*args, **kwargs):
        masks = sample_ibot_masks(*args, **kwargs)
        masks_seen.append(masks)
        return masks

    monkeypatch.setattr(meta_arch, "sample_ibot_masks", recording_masks)
    result = pretrain(store, run, tiny_config("ibot.mask_probability=0.5", "ibot.mask_ratio=[0.2,0.4]"))
    assert result["step"] == result["total_steps"] == 8  # 2 epochs of 4 steps
    lines = log_lines(run)
    assert [line["step"] for line in lines] == list(range(1, 9))
    for key in (
        "loss",
        "dino_loss",
        "ibot_loss",
        "koleo_loss",
        "lr",
        "weight_decay",
        "teacher_momentum",
        "teacher_temp",
        "teacher_entropy",
        "teacher_entropy_ibot",
        "teacher_top_mass",
        "teacher_cosine",
        "grad_norm_backbone",
        "grad_norm_dino_head",
        "volumes_per_s",
    ):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert lines[0]["teacher_temp"] == pytest.approx(0.04) and lines[-1]["teacher_temp"] == pytest.approx(0.07)
    assert lines[0]["lr"] == 0.0 and lines[4]["lr"] == pytest.approx(0.05 * np.sqrt(2 / 1024))
    # Masks: 2 global crops x 2 volumes per step, half of them masked, each at 20-40% of its 64 patches.
    assert len(masks_seen) == 8
    for masks in masks_seen:
        ratios = masks.float().mean(dim=1)
        assert int((ratios > 0).sum()) == 2
        assert all(0.2 - 1 / 64 <= r <= 0.4 + 1 / 64 for r in ratios[ratios > 0].tolist())
    # The teacher is an EMA of the student, not a copy; the exported backbone is the teacher's.
    student, teacher = result["student"], result["teacher"]
    differences = [
        float((s - t).abs().max()) for s, t in zip(student.state_dict().values(), teacher.state_dict().values())
    ]
    assert max(differences) > 1e-6
    exported = hub.load(run / "backbone")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, teacher.backbone.state_dict()[name]), name
    extra = hub.read_extra(run / "backbone")
    assert extra["step"] == 8 and extra["method"] == "dino" and extra["input_size"] == 32
    assert extra["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]
    assert extra["config_sha256"] == read_checkpoint(run / "checkpoint.pt")["meta"]["config_sha256"]


# --------------------------------------------------------------------------------- resume, SIGKILL
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(store, tmp_path):
    settings = ["optim.epochs=6", "engine.deterministic=true"]  # 24 steps, checkpoints every 4
    reference = tmp_path / "reference"
    subprocess.run(cli_command(store, reference, *settings), env=SUBPROCESS_ENV, check=True, capture_output=True)

    run = tmp_path / "killed"
    process = subprocess.Popen(
        cli_command(store, run, *settings), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = run / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # a checkpoint at step 4 is behind us
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = read_checkpoint(run / "checkpoint.pt")["step"]
    assert 4 <= killed_at < 24

    resumed = subprocess.run(cli_command(store, run, *settings), env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "24 of 24 steps" in resumed.stdout
    expected, actual = read_checkpoint(reference / "checkpoint.pt"), read_checkpoint(run / "checkpoint.pt")
    assert actual["step"] == expected["step"] == 24
    for part in ("student", "teacher"):
        for name, tensor in expected[part].items():
            assert torch.equal(actual[part][name], tensor), (part, name)
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
    # The log holds each step once, with the losses of the uninterrupted run.
    resumed_lines, reference_lines = log_lines(run), log_lines(reference)
    assert [line["step"] for line in resumed_lines] == list(range(1, 25))
    assert [line["loss"] for line in resumed_lines] == [line["loss"] for line in reference_lines]


def test_resume_refuses_a_changed_config_but_may_run_longer(store, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--store", str(store), "--out", str(run), *TINY, "optim.epochs=1"]) == 0
    first_epoch = read_checkpoint(run / "checkpoint.pt")
    assert first_epoch["step"] == 4
    # The prototypes stay at their initial values through the first epoch; the rest of the head learns.
    torch.manual_seed(0)
    initial = DINOModel(tiny_config()).state_dict()
    assert torch.equal(first_epoch["student"]["dino_head.prototypes"], initial["dino_head.prototypes"])
    assert not torch.equal(first_epoch["student"]["dino_head.mlp.0.weight"], initial["dino_head.mlp.0.weight"])
    assert main(["pretrain", "--store", str(store), "--out", str(run), *TINY, "optim.epochs=1", "model.depth=3"]) == 2
    assert main(["pretrain", "--store", str(store), "--out", str(run), *TINY, "optim.epochs=2"]) == 0
    second_epoch = read_checkpoint(run / "checkpoint.pt")
    assert second_epoch["step"] == 8
    assert not torch.equal(second_epoch["student"]["dino_head.prototypes"], initial["dino_head.prototypes"])
    assert [line["step"] for line in log_lines(run)] == list(range(1, 9))


def test_bad_inputs_exit_2_in_one_line(store, tmp_path, capsys):
    assert main(["pretrain", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert main(["pretrain", "--store", str(store), "--out", str(tmp_path / "r"), *TINY, "optim.batch_size=9"]) == 2
    assert main(["pretrain", "--store", str(store), "--out", str(tmp_path / "r"), *TINY, "model.in_chans=2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("fmct pretrain: ") for line in errors)
    assert "not an fmct store" in errors[0] and "do not fill one global batch" in errors[1] and "in_chans" in errors[2]


# ------------------------------------------------------------------------------------ NaN and MAE
def test_a_nan_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(store, tmp_path, capsys, monkeypatch):
    from fmct.ssl.koleo_loss import KoLeoLoss

    calls = {"n": 0}
    original = KoLeoLoss.forward

    def koleo_turning_nan(self, features):
        calls["n"] += 1
        value = original(self, features)
        return value * float("nan") if calls["n"] > 2 * 5 else value  # two global crops per step: NaN from step 6

    monkeypatch.setattr(KoLeoLoss, "forward", koleo_turning_nan)
    run = tmp_path / "run"
    assert main(["pretrain", "--store", str(store), "--out", str(run), *TINY, "engine.log_every=100"]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert len(error) == 1 and "NaN or infinite by step 8" in error[0] and "(step 4) kept" in error[0]
    assert error[0].startswith("fmct pretrain: loss became NaN or infinite")
    state = read_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["teacher"].values())
    assert hub.read_extra(run / "backbone")["step"] == 4


def test_the_mae_objective_trains_through_the_same_loop(store, tmp_path):
    run = tmp_path / "mae"
    result = pretrain(
        store,
        run,
        tiny_config("method=mae", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2", "optim.epochs=3"),
    )
    lines = log_lines(run)
    assert result["teacher"] is None and len(lines) == 12
    assert all(np.isfinite(line["mae_loss"]) for line in lines) and "teacher_temp" not in lines[0]
    # Normalised-pixel targets have unit variance: an untrained decoder starts near 1 and learns something.
    assert 0.5 < lines[0]["mae_loss"] < 2.0
    assert np.mean([line["mae_loss"] for line in lines[-4:]]) < lines[0]["mae_loss"]
    assert hub.read_extra(run / "backbone")["method"] == "mae"
    assert torch.equal(hub.load(run / "backbone").mask_token, torch.zeros(1, 64))  # MAE never uses it


def test_signed_change_heads_learn_hyperdense_and_hypodense_apart_and_travel_with_the_backbone(store, tmp_path):
    overrides = ("method=anomaly", "augment.n_local=0", "anomaly.air_margin_mm=4", "anomaly.signed=true")
    result = pretrain(store, tmp_path / "signed", tiny_config(*overrides, "optim.epochs=1"))
    lines = log_lines(tmp_path / "signed")
    # Fresh heads give logits near 0: ln 2 per element, whatever the number of kinds.
    assert abs(lines[0]["patch_change_loss"] - math.log(2)) < 0.2
    exported, student = hub.load(tmp_path / "signed" / "backbone").eval(), result["student"].eval()
    x = torch.rand(2, 3, 32, 32, 32)
    with torch.no_grad():
        patch_logits, scan_logits = student(x)
        change = exported.forward_features(x)["change"]
    assert exported.config.change_kinds == 2 and patch_logits.shape == (2, 2, 64) and change.shape == (2, 2)
    torch.testing.assert_close(change, scan_logits)


def test_the_anomaly_pretext_trains_through_the_same_loop_and_resumes_exactly(store, tmp_path):
    overrides = ("method=anomaly", "augment.n_local=0", "anomaly.probability=1.0", "anomaly.air_margin_mm=4")
    run = tmp_path / "anomaly"
    result = pretrain(store, run, tiny_config(*overrides, "optim.epochs=3"))
    lines = log_lines(run)
    assert result["teacher"] is None and len(lines) == 12
    # Every volume holds a change, so the per-crop term learns its target of (near) 1 at once; the
    # per-patch term starts at ln 2 (fresh heads: logits near 0) and falls.
    assert all(np.isfinite(line["patch_change_loss"]) and np.isfinite(line["scan_change_loss"]) for line in lines)
    assert abs(lines[0]["patch_change_loss"] - math.log(2)) < 0.2
    assert np.mean([line["patch_change_loss"] for line in lines[-4:]]) < lines[0]["patch_change_loss"]
    assert hub.read_extra(run / "backbone")["method"] == "anomaly"
    # The change heads travel with the exported backbone: its change feature is the trained scan logit.
    exported, student = hub.load(run / "backbone").eval(), result["student"].eval()
    x = torch.rand(2, 3, 32, 32, 32)
    with torch.no_grad():
        patch_logits, scan_logits = student(x)
        change = exported.forward_features(x)["change"]
    assert exported.config.change_heads and patch_logits.shape == (2, 1, 64)
    torch.testing.assert_close(change, scan_logits)
    from fmct.ssl.release import package

    card = (package(run, tmp_path / "card", "fmct-test", "phantoms", "pytest", "a CPU") / "README.md").read_text()
    assert "and the change logit" in card
    # Changes are drawn from (seed, step): a run stopped at step 5 and resumed ends with the same weights.
    halves = tmp_path / "halves"
    pretrain(store, halves, tiny_config(*overrides, "optim.epochs=3", "engine.stop_at_step=5"))
    pretrain(store, halves, tiny_config(*overrides, "optim.epochs=3"))
    whole, resumed = read_checkpoint(run / "checkpoint.pt"), read_checkpoint(halves / "checkpoint.pt")
    for name, tensor in whole["student"].items():
        assert torch.allclose(tensor, resumed["student"][name], atol=1e-5), name


def test_the_anomaly_pretext_needs_the_stores_voxel_size(tmp_path):
    path = tmp_path / "store"
    write_scan(path, np.zeros((32, 32, 32), np.int16), {"scan_id": "a", "store_shape": [32] * 3})
    write_scan(path, np.zeros((32, 32, 32), np.int16), {"scan_id": "b", "store_shape": [32] * 3})
    rebuild_tables(path)
    with pytest.raises(ConfigError, match="store_spacing_mm"):
        pretrain(path, tmp_path / "run", tiny_config("method=anomaly", "augment.n_local=0"))


# ------------------------------------------------------------------------------------ distributed
def _worker(rank: int, store: str, run: str, port: int, sharding: str) -> None:
    from torch.distributed.tensor import DTensor

    import fmct.ssl.train as train

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    sharded = []  # whether the student trained as FSDP2 shards (a flag: a reference would keep the group alive)
    wrap_student = train.wrap_student

    def recording_wrap(*args):
        wrapped = wrap_student(*args)
        sharded.append(isinstance(next(wrapped.parameters()), DTensor))
        return wrapped

    train.wrap_student = recording_wrap
    result = pretrain(store, run, tiny_config(f"engine.sharding={sharding}", "optim.epoch_length=2"))
    assert sharded == [sharding == "fsdp"]
    # Every rank gets plain modules with the whole weights, also after FSDP2.
    state = {f"student.{k}": v for k, v in result["student"].state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in result["teacher"].state_dict().items()})
    assert not any(isinstance(tensor, DTensor) for tensor in state.values())
    torch.save(state, f"{run}/rank{rank}.pt")


def run_two_processes(store: Path, run: Path, sharding: str) -> Path:
    """A 2-process gloo pretraining of the tiny config (2 volumes per rank, 2 epochs of 2 steps)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(str(store), str(run), port, sharding), nprocs=2)
    return run


@pytest.fixture(scope="module")
def ddp_run(store, tmp_path_factory) -> Path:
    return run_two_processes(store, tmp_path_factory.mktemp("ddp") / "run", "ddp")


def test_two_gloo_processes_end_with_identical_weights(ddp_run):
    rank0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
    assert read_checkpoint(ddp_run / "checkpoint.pt")["step"] == 4
    assert [line["step"] for line in log_lines(ddp_run)] == [1, 2, 3, 4]
    initial = DINOModel(tiny_config()).state_dict()
    moved = (
        (rank0["student.backbone.patch_embed.proj.weight"] - initial["backbone.patch_embed.proj.weight"]).abs().max()
    )
    assert float(moved) > 1e-5


def test_fsdp2_sharding_trains_like_ddp(store, ddp_run, tmp_path):
    fsdp_run = run_two_processes(store, tmp_path / "run", "fsdp")
    expected, actual = read_checkpoint(ddp_run / "checkpoint.pt"), read_checkpoint(fsdp_run / "checkpoint.pt")
    assert actual["step"] == 4
    # FSDP sums the gradients in another order than DDP: a relative difference of a few float32 ulps. Adam
    # normalises each parameter's step, so that difference moves a parameter by a few ulps of its step too,
    # except where a gradient sum nearly cancels: there the sign can flip and the step differs by up to 2 lr.
    # Such parameters are few, so over all parameters the runs must agree far better than two runs that
    # differ in substance (other data, a wrong reduction), which differ by about as much as training moved
    # the weights. The bound: a mean absolute difference under 1 % of the mean absolute movement.
    initial = DINOModel(tiny_config()).state_dict()
    for part in ("student", "teacher"):
        names = [name for name in expected[part] if expected[part][name].is_floating_point()]
        difference = torch.cat([(actual[part][n] - expected[part][n]).abs().flatten() for n in names]).mean()
        moved = torch.cat([(expected[part][n] - initial[n]).abs().flatten() for n in names if n in initial]).mean()
        assert float(moved) > 0 and float(difference) < 0.01 * float(moved), (part, float(difference), float(moved))
    assert sorted(expected["optimizer"]["state"]) == sorted(actual["optimizer"]["state"])
    rank0 = torch.load(fsdp_run / "rank0.pt", weights_only=True)
    rank1 = torch.load(fsdp_run / "rank1.pt", weights_only=True)
    for part in ("student", "teacher"):
        for name, tensor in actual[part].items():
            assert torch.equal(rank0[f"{part}.{name}"], tensor) and torch.equal(rank1[f"{part}.{name}"], tensor), name


# --------------------------------------------------------------------------------------- collapse
def test_collapse_is_recognised_from_teacher_statistics():
    rows, prototypes = 32, 256
    collapsed = torch.zeros(rows, prototypes)
    collapsed[:, 7] = 1.0
    healthy = torch.softmax(torch.randn(rows, prototypes, generator=torch.Generator().manual_seed(0)) * 5, dim=1)
    uniform = torch.full((rows, prototypes), 1 / prototypes)

    def reason(probs: torch.Tensor, warm: bool = True) -> str | None:
        return collapse_reason({k: float(v) for k, v in teacher_statistics(probs).items()}, prototypes, warm)

    stats = {k: float(v) for k, v in teacher_statistics(collapsed).items()}
    assert stats["teacher_top_mass"] == 1.0 and stats["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert "one prototype holds 100%" in reason(collapsed)
    assert float(teacher_statistics(uniform)["teacher_entropy"]) == pytest.approx(np.log(prototypes), rel=1e-5)
    assert "nearly uniform (entropy 5.545 of at most 5.545 nats)" in reason(uniform)
    assert reason(uniform, warm=False) is None  # an untrained teacher starts uniform
    assert reason(healthy) is None and float(teacher_statistics(healthy)["teacher_entropy"]) < 0.9 * np.log(prototypes)
    # Too few crops to tell collapse from agreement between two views of the same scans.
    assert reason(collapsed[:4]) is None


def test_the_monitor_warns_of_collapse_once_and_drops_torn_lines(tmp_path, capsys):
    from fmct.distributed import DistEnv
    from fmct.ssl.config import EngineConfig
    from fmct.ssl.schedules import StepValues

    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    monitor = Monitor(
        tmp_path,
        env,
        EngineConfig(progress=False),
        start_step=1,
        total_steps=10,
        global_batch=16,
        steps_per_epoch=5,
        n_prototypes=256,
        teacher_warm_step=5,
    )
    assert [line["step"] for line in log_lines(tmp_path)] == [1]
    collapsed = torch.zeros(32, 256)
    collapsed[:, 3] = 1.0
    values = StepValues(
        lr=1e-3, weight_decay=0.04, teacher_momentum=0.996, teacher_temp=0.05, freeze_last_layer=False, dino_weight=1.0
    )
    for step in (2, 3):
        monitor.add({"loss": torch.tensor(5.0), **teacher_statistics(collapsed)})
        monitor.log(step, values)
    monitor.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "step 2: one prototype holds 100%" in warnings[0]
    lines = log_lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[-1]["teacher_top_mass"] == 1.0
    assert lines[-1]["epoch"] == 0.6 and lines[-1]["volumes_per_s"] > 0


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_a_short_cpu_pretraining_lowers_the_loss_without_collapse(tmp_path):
    """160 steps of the tiny model on 32 textured phantoms (batch 8, 1024 prototypes), about 20 s.

    The total loss falls through iBOT and KoLeo; the teacher never puts its mass on one prototype. On
    a run this short the DINO (CLS) term stays close to ln K: the teacher starts nearly uniform, as the
    backbone's CLS barely depends on its input at initialisation, and it takes longer to bootstrap.
    """
    store = make_store(tmp_path / "store", n=32, size=48, seed=1)
    run = tmp_path / "run"
    pretrain(
        store,
        run,
        tiny_config(
            "optim.batch_size=8",
            "optim.epochs=40",
            "optim.warmup_epochs=4",
            "optim.base_lr=0.044",
            "dino.teacher_temp_warmup_epochs=10",
            "engine.log_every=4",
            "engine.checkpoint_every=1000",
            "dino.n_prototypes=1024",
        ),
    )
    lines = log_lines(run)

    def mean(key: str, part: slice) -> float:
        return float(np.mean([line[key] for line in lines[part]]))

    assert mean("loss", slice(-3, None)) < mean("loss", slice(0, 3)) - 1.0
    assert mean("ibot_loss", slice(-3, None)) < mean("ibot_loss", slice(0, 3)) - 0.3
    assert all(line["teacher_top_mass"] < 0.5 and line["teacher_entropy"] > 0.5 * np.log(1024) for line in lines)


@pytest.mark.slow
def test_pretraining_on_a_synth_cohort_lowers_the_loss_without_collapse(tmp_path):
    """The same on real pipeline data: 24 synthetic heads as NIfTI, ingested at 48^3 x 4 mm, 160 steps."""
    from fmct.config import IngestConfig
    from fmct.ingest import ingest
    from fmct.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", n=24, sites=("A", "B"), fmt="nifti", matrix=128, workers=2)
    config = load_config(IngestConfig, None, ["canonical.shape=[48,48,48]", "canonical.spacing_mm=4.0"])
    ingest([tmp_path / "cohort" / "nifti"], tmp_path / "store", config, progress=False)
    run = tmp_path / "run"
    pretrain(
        tmp_path / "store",
        run,
        tiny_config(
            "optim.batch_size=8",
            "optim.epoch_length=3",
            "optim.epochs=54",
            "optim.warmup_epochs=6",
            "optim.base_lr=0.044",
            "dino.teacher_temp_warmup_epochs=10",
            "engine.log_every=4",
            "engine.checkpoint_every=1000",
            "dino.n_prototypes=1024",
        ),
    )
    lines = log_lines(run)
    first, last = lines[:3], lines[-3:]
    assert np.mean([line["loss"] for line in last]) < np.mean([line["loss"] for line in first]) - 0.5
    assert all(line["teacher_top_mass"] < 0.5 and line["teacher_entropy"] > 0.5 * np.log(1024) for line in lines)


PACKAGED = Path(__file__).parents[1] / "src" / "fmct" / "configs"


@pytest.mark.parametrize("name", sorted(path.name for path in PACKAGED.glob("pretrain_*.yaml")))
def test_packaged_recipes_load(name):
    config = load_config(PretrainConfig, PACKAGED / name)
    assert config.model.in_chans == len(config.augment.windows) == 3


def test_a_held_out_site_is_left_out_of_pretraining(store, tmp_path):
    from fmct.ssl.config import DataConfig
    from fmct.ssl.train import pretraining_scan_ids

    labels = tmp_path / "labels.csv"
    labels.write_text("scan_id,site,ich\n" + "".join(f"scan{i:03d},{'C' if i < 3 else 'A'},0\n" for i in range(8)))
    kept = pretraining_scan_ids(store, DataConfig(labels=str(labels), exclude_sites=("C",)))
    assert kept == [f"scan{i:03d}" for i in range(3, 8)]
    assert pretraining_scan_ids(store, DataConfig()) is None


# ----------------------------------------------------------------------------------- online evaluation
def test_rankme_and_output_cosine_hand_examples():
    from fmct.ssl.collapse import output_cosine
    from fmct.ssl.online_eval import rankme

    assert rankme(np.eye(4)) == pytest.approx(4.0, rel=1e-5)  # four equal singular values
    assert rankme(np.ones((4, 6))) == pytest.approx(1.0, abs=1e-4)  # one direction only
    assert float(output_cosine(torch.ones(5, 8))) == pytest.approx(1.0)  # every scan alike
    assert float(output_cosine(torch.eye(4))) == pytest.approx(0.0)  # orthogonal outputs
    assert float(output_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))) == pytest.approx(np.sqrt(0.5))


def labelled_store(path: Path, n: int = 16) -> tuple[Path, Path]:
    """``n`` phantoms and a labels CSV: ``ich`` alternating, patients of two scans, the last two in the test split."""
    make_store(path / "store", n=n, size=48, seed=3)
    labels = path / "labels.csv"
    rows = [f"scan{i:03d},p{i // 2:02d},{'test' if i >= n - 2 else ''},{i % 2}\n" for i in range(n)]
    labels.write_text("scan_id,patient_id,split,ich\n" + "".join(rows))
    return path / "store", labels


def test_online_metrics_appear_in_the_log_from_step_0(tmp_path):
    from fmct.ssl.online_eval import OnlineEvaluator

    store, labels = labelled_store(tmp_path)
    evaluator = OnlineEvaluator(
        store,
        str(labels),
        ["ich"],
        max_scans=64,
        knn_k=5,
        excluded_sites=(),
        windows=[(40.0, 80.0)],
        device=torch.device("cpu"),
    )
    assert "scan014" not in evaluator.scan_ids and "scan015" not in evaluator.scan_ids  # never the test split
    assert len(evaluator.scan_ids) == 14 and evaluator.scored == [(0, "ich")]
    halves = dict(zip(evaluator.scan_ids, evaluator.half))
    assert all(halves[f"scan{2 * p:03d}"] == halves[f"scan{2 * p + 1:03d}"] for p in range(7))  # by patient

    run = tmp_path / "run"
    pretrain(
        store,
        run,
        tiny_config(
            "online_eval.every=4",
            f"online_eval.labels={labels}",
            "optim.epochs=2",
            "engine.log_every=2",
            "online_eval.knn_k=5",
        ),
    )
    lines = log_lines(run)
    online = [line for line in lines if "online_rankme" in line]
    assert [line["step"] for line in online] == [0, 4, 8]
    for line in online:
        assert 1.0 <= line["online_rankme"] <= 64
        assert 0.0 <= line["online_knn_auroc_ich"] <= 1.0 and 0.0 <= line["online_linear_auroc_ich"] <= 1.0
    assert all("online_rankme" not in line for line in lines if line["step"] in (2, 6))
    # The same figures in TensorBoard, when it is installed (the `tensorboard` extra).
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("online_knn_auroc_ich")] == [0, 4, 8]
    assert "teacher_cosine" in events.Tags()["scalars"]


@pytest.mark.slow
def test_pretraining_raises_the_online_knn_auroc_above_random_init(tmp_path):
    """A learning check that can fail: 600 steps on 64 phantoms must lift the online k-NN AUROC of a
    scan-level property on validation scans (fitted on one half, scored on the other, by patient) clearly
    above what the same backbone gives at step 0, its random initialisation.

    The property is the grain of the brain's texture (smooth with sigma 3-4 voxels, or fine with 1-1.8):
    visible in every crop of a scan, so self-distillation has every reason to encode it, while a fresh
    ViT's CLS, nearly the same for every scan, does not tell the two apart.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(11)
    size, n = 48, 64
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    store, labels = tmp_path / "store", tmp_path / "labels.csv"
    rows = []
    for i in range(n):
        coarse = i % 2
        radius = np.sqrt(sum((a / r) ** 2 for a, r in zip(axes, rng.uniform(0.7, 0.9, 3))))
        texture = gaussian_filter(
            rng.normal(size=(size,) * 3), sigma=rng.uniform(3.0, 4.0) if coarse else rng.uniform(1.0, 1.8)
        )
        hu = np.full((size,) * 3, -1000, np.int16)
        hu[radius < 0.95] = 1200
        brain = radius < 0.85
        hu[brain] = np.round(35 + 10 * texture[brain] / texture.std())
        write_scan(store, hu, {"scan_id": f"scan{i:03d}", "store_shape": [size] * 3})
        rows.append(f"scan{i:03d},p{i:03d},{coarse}\n")
    rebuild_tables(store)
    labels.write_text("scan_id,patient_id,coarse\n" + "".join(rows))
    run = tmp_path / "run"
    pretrain(
        store,
        run,
        tiny_config(
            "model.layerscale_init=null",
            "optim.batch_size=8",
            "optim.epoch_length=30",
            "optim.epochs=20",
            "optim.warmup_epochs=1",
            "optim.base_lr=0.004",
            "dino.start_epochs=1",
            "dino.teacher_temp_warmup_epochs=3",
            "engine.log_every=10",
            "engine.checkpoint_every=1000",
            "online_eval.every=150",
            f"online_eval.labels={labels}",
            "online_eval.knn_k=10",
        ),
    )
    online = [line for line in log_lines(run) if "online_knn_auroc_coarse" in line]
    assert [line["step"] for line in online] == [0, 150, 300, 450, 600]
    at_init, trained = online[0]["online_knn_auroc_coarse"], online[-1]["online_knn_auroc_coarse"]
    # Measured on the 2-core dev VM: 0.453 at step 0, 0.621 at step 600 (RankMe 2.8 -> 13.4).
    assert trained > at_init + 0.1, (at_init, trained)
    assert online[-1]["online_rankme"] > online[0]["online_rankme"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pretrain_synth_tiny", "pretrain_synth_tiny_mae"])
def test_pretraining_on_the_conv_stem_raises_the_online_bleed_auroc_above_random_init(tmp_path, recipe):
    """A learning check that can fail: the shipped recipe (pretrain_synth_tiny: synthetic anomalies on the
    conv-stem backbone) and the MAE recipe before it, 300 steps on 96 heads of 64^3 of which half hold a
    small faint blob (radius 3 voxels, 70 HU in a 35 HU brain, 8 HU noise), must lift the online linear
    probe's AUROC for the blob (fmct probe's features and choice, fitted on one half of the scans and
    scored on the other) above what the same backbone gives at step 0, its random initialisation."""
    from test_embed import write_blob_store

    write_blob_store(tmp_path, n_scans=96, size=64, seed=5, blob_hu=70.0, blob_radius=3.0)
    run = tmp_path / "run"
    config = load_config(
        PretrainConfig,
        recipe,
        [
            "engine.device=cpu",
            "optim.epoch_length=20",
            "optim.epochs=15",
            "optim.warmup_epochs=1",
            "engine.log_every=20",
            "engine.checkpoint_every=1000",
            "online_eval.every=150",
            f"online_eval.labels={tmp_path / 'labels.csv'}",
            "online_eval.findings=[ich]",
        ],
    )
    pretrain(tmp_path / "store", run, config)
    online = [line for line in log_lines(run) if "online_linear_auroc_ich" in line]
    assert [line["step"] for line in online] == [0, 150, 300]
    at_init, trained = online[0]["online_linear_auroc_ich"], online[-1]["online_linear_auroc_ich"]
    assert trained > at_init + 0.05, (at_init, trained)


def test_a_run_stopped_at_a_step_resumes_to_the_weights_of_one_that_never_stopped(store, tmp_path, capsys):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    pretrain(store, whole, tiny_config("engine.deterministic=true"))
    stopped = pretrain(store, halves, tiny_config("engine.deterministic=true", "engine.stop_at_step=3"))
    assert stopped["step"] == 3 and read_checkpoint(halves / "checkpoint.pt")["step"] == 3
    resumed = pretrain(store, halves, tiny_config("engine.deterministic=true"))
    assert resumed["step"] == 8 and "resuming" in capsys.readouterr().err
    expected, actual = read_checkpoint(whole / "checkpoint.pt"), read_checkpoint(halves / "checkpoint.pt")
    for name, tensor in expected["student"].items():
        assert torch.equal(tensor, actual["student"][name]), name
    assert [line["loss"] for line in log_lines(whole)] == [line["loss"] for line in log_lines(halves)]

    # The finished run packaged as a shipped checkpoint: weights, log, recipe and a model card.
    from fmct.ssl.release import package

    folder = package(halves, tmp_path / "fmct-test", "fmct-test", "8 phantoms", "pytest", "a CPU")
    for name, tensor in hub.load(folder).state_dict().items():
        assert torch.equal(tensor, hub.load(halves / "backbone").state_dict()[name]), name
    card = (folder / "README.md").read_text()
    assert "# fmct-test" in card and "8 steps x 2 volumes = 16 volume passes" in card and "## Limits" in card
    assert (
        hub.training_log(folder) == folder / "log.jsonl"
        and hub.training_log(halves / "backbone") == halves / "log.jsonl"
    )
    # No folder of this machine leaves in the shipped files, only bare names.
    for file in ("config.json", "recipe.yaml"):
        assert str(tmp_path) not in (folder / file).read_text(), file
    assert json.loads((folder / "config.json").read_text())["store"]["name"] == store.name


def test_the_teacher_follows_the_students_batch_norm_statistics():
    """The teacher runs in eval mode, so it never estimates batch-norm statistics itself: without the EMA of
    the student's it would normalise its conv stem by mean 0 and variance 1 for the whole run."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    teacher = deepcopy(student).eval().requires_grad_(False)
    student(torch.rand(2, 1, 5, 5, 5) + 3.0)  # train mode: the student's running mean moves towards ~3 * weights
    norm_s, norm_t = student[1], teacher[1]
    assert not torch.equal(norm_s.running_mean, norm_t.running_mean)
    update_teacher(teacher, student, momentum=0.9)
    # lerp and this sum round differently: a few float32 ulps (1.2e-7 each) of values near 1.
    torch.testing.assert_close(norm_t.running_mean, 0.1 * norm_s.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(norm_t.running_var, 0.9 + 0.1 * norm_s.running_var, rtol=0, atol=1e-6)
    assert int(norm_t.num_batches_tracked) == 1
