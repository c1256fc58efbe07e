"""Beyond one machine: ``torchrun --nnodes 2`` (two simulated nodes on this machine, gloo on the CPU)
reaches the weights of one process with the same global batch; ``fmct embed`` sharded over two ranks
writes the table of one process.

Why the two-node run can equal the single process: rank r of W takes volumes ``r*B .. r*B+B-1`` of
each global batch (:class:`fmct.data.StepBatchSampler`), and crops and masks are drawn for the global
batch from ``batch_generator(seed, step)`` with each rank keeping its volumes' rows, so the ranks
together compute exactly the single process's crops. Every loss term is a mean over the rank's
batch that DDP's gradient mean turns into the mean over the global batch; Sinkhorn-Knopp sums over
all ranks. KoLeo is the exception, by design (as in DINOv2): its nearest neighbours are searched
within a rank's batch, so with KoLeo on, 2 x 2 volumes differ from 1 x 4. The comparison therefore
sets ``koleo.loss_weight=0``; stochastic depth (off in the tiny model) also draws per rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fmct
from fmct.eval.embed import EmbedConfig, embed_store
from fmct.eval.embeddings import read_embeddings
from fmct.ssl.checkpoint import read_checkpoint
from fmct.ssl.meta_arch import DINOModel
from fmct.ssl.train import pretrain
from test_pretrain import TINY, log_lines, make_store, tiny_config

torch.set_num_threads(1)

# 4 steps (2 epochs of 2): LR warm-up, the frozen last layer and the teacher temperature warm-up all
# happen inside them. KoLeo off: see the module docstring.
RUN = ["optim.epoch_length=2", "optim.epochs=2", "engine.checkpoint_every=4", "koleo.loss_weight=0"]
# The same sums in another order (float32: DDP's all-reduce of two half-batch gradients vs one
# process's sum over four volumes), through 4 AdamW steps, whose m / sqrt(v) lifts rounding noise in
# near-zero gradients towards the step size: measured worst 1.2e-5 on this machine (dino_head MLP),
# where the run moves the weights by up to 6.3e-3 (peak LR 3.1e-3). The tolerance is under 1% of that.
ATOL = 5e-5
MOVED = 3e-3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict:
    """One thread per process, and this checkout's fmct first on the path."""
    src = str(Path(fmct.__file__).resolve().parents[1])
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }


def torchrun_nodes(n_nodes: int, nproc_per_node: int, args: list[str], timeout_s: float = 180) -> list[str]:
    """``torchrun -m fmct.cli ARGS`` as ``n_nodes`` separate launchers (one per simulated node, node ranks
    0..n-1) rendezvousing on a free localhost port, as ``srun`` starts them on a cluster; their outputs."""
    port = free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={n_nodes}",
                f"--nproc-per-node={nproc_per_node}",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "fmct.cli",
                *args,
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(n_nodes)
    ]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=timeout_s)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for node, (launcher, output) in enumerate(zip(launchers, outputs)):
        assert launcher.returncode == 0, f"node {node} exited {launcher.returncode}:\n{output[-3000:]}"
    return outputs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def test_two_nodes_reach_the_weights_of_one_process_with_the_same_global_batch(store, tmp_path):
    two_nodes = tmp_path / "two_nodes"
    torchrun_nodes(
        2, 1, ["pretrain", "--store", str(store), "--out", str(two_nodes), *TINY, *RUN, "optim.batch_size=2"]
    )
    one = tmp_path / "one_process"
    pretrain(store, one, tiny_config(*RUN, "optim.batch_size=4"))

    expected, actual = read_checkpoint(one / "checkpoint.pt"), read_checkpoint(two_nodes / "checkpoint.pt")
    assert actual["step"] == expected["step"] == 4
    assert actual["meta"]["world_size"] == 2 and expected["meta"]["world_size"] == 1
    worst = max(
        float((actual[part][name] - tensor).abs().max())
        for part in ("student", "teacher")
        for name, tensor in expected[part].items()
    )
    assert worst <= ATOL, f"largest weight difference {worst:.3g} (tolerance {ATOL})"
    # The weights did move (from the seed's initial model): the comparison is not of two untrained models.
    config = tiny_config()
    torch.manual_seed(config.engine.seed)
    start = DINOModel(config).state_dict()
    moved = max(float((expected["student"][name] - tensor).abs().max()) for name, tensor in start.items())
    assert moved > MOVED, moved
    # The loss terms logged each step (means over ranks) are those of the single process.
    for two, single in zip(log_lines(two_nodes), log_lines(one), strict=True):
        for key in ("dino_loss", "ibot_loss", "teacher_entropy"):
            assert two[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), (two["step"], key)


# Stand-ins for Slurm's commands: scontrol names the nodes, srun runs its command once per node with
# that node's SLURM_NODEID, as srun --ntasks-per-node=1 does on a two-node allocation.
FAKE_SCONTROL = """#!/bin/bash
echo localhost
echo localhost
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_the_slurm_recipe_trains_on_two_nodes_and_resumes(store, tmp_path):
    """scripts/slurm/pretrain.sbatch under stand-in srun and scontrol: 2 nodes x 1 process, the run
    stopped at step 2 by the first job (as a time limit would) and finished by the second."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "pretrain.sbatch"
    env = {
        **subprocess_env(),
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    run = tmp_path / "run"
    args = ["bash", str(script), str(store), str(run), *TINY, *RUN, "optim.batch_size=2"]
    first = subprocess.run([*args, "engine.stop_at_step=2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2
    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stderr and read_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert [line["step"] for line in log_lines(run)] == [1, 2, 3, 4]


def test_embed_sharded_over_two_ranks_writes_the_table_of_one_process(store, tmp_path):
    from fmct import hub
    from fmct.models import ViT3DConfig, build_vit3d

    torch.manual_seed(0)
    model = hub.save(
        build_vit3d(
            ViT3DConfig(size="tiny", depth=2, embed_dim=32, n_heads=2, img_size=(16, 16, 16), patch_size=(8, 8, 8))
        ),
        tmp_path / "model",
    )
    # 8 scans in chunks of 2: 4 chunks, two per rank.
    args = [
        "embed",
        "--model",
        str(model),
        "--store",
        str(store),
        "--batch-size",
        "2",
        "--workers",
        "1",
        "chunk_size=2",
    ]
    (output,) = torchrun_nodes(1, 2, [*args, "--out", str(tmp_path / "sharded")])
    assert "embed: 8 scans" in output and "on 2 ranks" in output and "(0 of 4 chunks reused)" in output
    config = EmbedConfig(batch_size=2, workers=1, chunk_size=2)
    embed_store(model, store, tmp_path / "single", config, device="cpu", progress=False)
    sharded, single = read_embeddings(tmp_path / "sharded"), read_embeddings(tmp_path / "single")
    assert list(sharded.scan_ids) == list(single.scan_ids) and len(single.scan_ids) == 8
    for name in ("cls", "patch_mean"):
        # The same batches through the same fp32 forward, each on one thread: equal to the bit.
        assert np.array_equal(sharded.features[name], single.features[name]), name
    # Run again in one process: every chunk the two ranks wrote is reused.
    again = embed_store(model, store, tmp_path / "sharded", config, device="cpu", progress=False)
    assert again.n_chunks_reused == 4 and again.n_embedded == 8
