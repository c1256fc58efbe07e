"""The CUDA engine: bf16 autocast, fused AdamW, compiled blocks, FSDP2 on one GPU, exact resume on CUDA.

Marked ``cuda`` and skipped without a CUDA device (here: always). ``benchmarks/gpu_suite.sh`` runs
them on a GPU machine: ``pytest -m cuda tests/test_cuda.py``. The tiny pretraining model of
tests/test_pretrain.py, on the device.
"""

from __future__ import annotations

import socket
import subprocess
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist

from fmct.distributed import DistEnv
from fmct.ssl.checkpoint import read_checkpoint
from fmct.ssl.distributed import full_tensor, shard
from fmct.ssl.meta_arch import DINOModel
from fmct.ssl.schedules import Schedules
from fmct.ssl.train import Trainer, build_optimizer, compile_blocks
from test_multinode import subprocess_env
from test_pretrain import cli_command, make_store, tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=CUDA)
# A long run's schedules at a step past the warm-ups: LR, prototypes and teacher all in their ordinary regime.
STEP = 6


def cuda_config(*overrides: str):
    return tiny_config("engine.device=cuda", "optim.epochs=4", *overrides)


def hu_batch(batch: int = 2, size: int = 48) -> torch.Tensor:
    """int16 HU (B, 1, size^3): air, a skull, a textured brain, different per volume."""
    generator = torch.Generator().manual_seed(0)
    axis = torch.linspace(-1, 1, size)
    radius = torch.sqrt(sum(a**2 for a in torch.meshgrid(axis, axis, axis, indexing="ij")))
    head = torch.where(radius < 0.9, torch.where(radius < 0.8, 35, 1200), -1000)
    texture = torch.randint(-15, 16, (batch, 1, size, size, size), generator=generator)
    return (head + texture).to(torch.int16)


def trainer(config) -> Trainer:
    return Trainer(config, ENV, Schedules(config, global_batch=config.optim.batch_size))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


def test_a_bf16_step_runs_the_blocks_in_bf16_and_the_losses_in_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    block_dtypes = []
    bf16, fp32 = trainer(cuda_config()), trainer(cuda_config("engine.bf16=false", "engine.tf32=false"))
    bf16.student.backbone.blocks[0].register_forward_hook(
        lambda module, inputs, output: block_dtypes.append(output.dtype)
    )
    hu = hu_batch()
    low, full = bf16.step(hu, STEP), fp32.step(hu, STEP)
    assert block_dtypes and set(block_dtypes) == {torch.bfloat16}
    for name in ("dino_loss", "ibot_loss", "koleo_loss", "loss"):
        assert low[name].dtype == torch.float32, name
        assert torch.isfinite(low[name]), name
        # Same weights and crops: bf16 rounding (3 significant digits) moves each term by a few percent at most.
        assert float(low[name]) == pytest.approx(float(full[name]), rel=5e-2, abs=2e-2), name
    assert all(torch.isfinite(low[f"grad_norm_{part}"]) for part in ("backbone", "dino_head"))


def test_fused_adamw_steps_like_the_plain_implementation():
    config = cuda_config()
    torch.manual_seed(0)
    model = DINOModel(config).to(CUDA)
    reference = deepcopy(model)
    fused = build_optimizer(model, config, CUDA)
    assert fused.defaults["fused"] is True
    groups = reference.param_groups(
        config.optim.weight_decay, config.optim.layer_decay, config.optim.patch_embed_lr_mult
    )
    plain = torch.optim.AdamW(groups, lr=0.0, betas=config.optim.betas, fused=False, foreach=False)
    for optimizer in (fused, plain):
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 1e-3 * group["lr_scale"], 0.04 * group["wd_scale"]
    generator = torch.Generator(CUDA).manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn(p.shape, device=CUDA, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_blocks_compute_what_eager_blocks_do():
    torch.backends.cuda.matmul.allow_tf32 = False
    config = cuda_config()
    torch.manual_seed(0)
    eager = DINOModel(config).to(CUDA)
    compiled = deepcopy(eager)
    compile_blocks([compiled])
    generator = torch.Generator(CUDA).manual_seed(2)
    global_crops = torch.rand(4, 3, 32, 32, 32, device=CUDA, generator=generator)
    local_crops = torch.rand(4, 3, 16, 16, 16, device=CUDA, generator=generator)
    masks = torch.zeros(4, 64, dtype=torch.bool, device=CUDA)
    masks[0, :20] = masks[2, 10:40] = True
    masked_index = masks.flatten().nonzero().squeeze(1)
    outputs = [model(global_crops, masked_index, masks=masks, local_crops=local_crops) for model in (eager, compiled)]
    for name in ("cls", "cls_logits", "patch_logits"):
        torch.testing.assert_close(getattr(outputs[1], name), getattr(outputs[0], name), rtol=1e-4, atol=1e-4, msg=name)
    for output in outputs:
        (output.cls_logits.square().mean() + output.patch_logits.square().mean()).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    # And the engine's own compiled step (engine.compile=true) trains.
    metrics = trainer(cuda_config("engine.compile=true")).step(hu_batch(), STEP)
    assert torch.isfinite(metrics["loss"])


def test_fsdp2_on_one_gpu_steps_like_the_unsharded_model():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=CUDA)
    try:
        config = cuda_config()
        plain, sharded = trainer(config), trainer(config)
        shard(sharded.student)
        shard(sharded.teacher)
        sharded.optimizer = build_optimizer(sharded.student, config, CUDA)  # over the sharded parameters
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in sharded.student.parameters())
        hu = hu_batch()
        for step in range(STEP, STEP + 2):
            expected, actual = plain.step(hu, step), sharded.step(hu, step)
            assert float(actual["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-4), step
        for model in ("student", "teacher"):
            pairs = zip(getattr(plain, model).named_parameters(), getattr(sharded, model).parameters(), strict=True)
            for (name, p), q in pairs:
                torch.testing.assert_close(
                    full_tensor(q.detach()), p.detach(), rtol=1e-4, atol=1e-5, msg=f"{model}.{name}"
                )
    finally:
        dist.destroy_process_group()


def test_a_cuda_run_stopped_and_resumed_reaches_the_weights_of_one_that_never_stopped(store, tmp_path):
    """Deterministic kernels on (engine.deterministic): 8 steps in one go, and 4 + 4 in two processes."""
    settings = ["engine.device=cuda", "engine.deterministic=true"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    for command in (
        cli_command(store, reference, *settings),
        cli_command(store, run, *settings, "engine.stop_at_step=4"),
        cli_command(store, run, *settings),
    ):
        result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = read_checkpoint(reference / "checkpoint.pt"), read_checkpoint(run / "checkpoint.pt")
    assert actual["step"] == expected["step"] == 8
    for part in ("student", "teacher"):
        for name, tensor in expected[part].items():
            assert torch.equal(actual[part][name], tensor), (part, name)
