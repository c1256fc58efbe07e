"""Streaming shards: `fmct store pack`, every scan once per epoch in a deterministic order that changes
with the epoch, exact resume per rank, shards behind a URL, and pretraining from shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmct.cli import main
from fmct.config import load_config
from fmct.data.shards import INDEX_FILE, ShardVolumes, pack_store
from fmct.errors import ConfigError, InputError, ScanError
from fmct.ssl.checkpoint import read_checkpoint
from fmct.ssl.config import PretrainConfig
from fmct.ssl.train import pretrain
from fmct.store import Store, rebuild_tables, write_scan

torch.set_num_threads(1)
SHAPE = (6, 5, 4)


def make_store(path: Path, n: int = 20, shape=SHAPE) -> Path:
    """``n`` scans whose every voxel is 100 * i + its position: each volume says which scan it is."""
    for i in range(n):
        hu = (np.arange(np.prod(shape)).reshape(shape) + 100 * i - 1000).astype(np.int16)
        write_scan(path, hu, {"scan_id": f"scan{i:03d}", "store_shape": list(shape), "store_spacing_mm": [3.0] * 3})
    rebuild_tables(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    make_store(root / "store")
    assert main(["store", "pack", str(root / "store"), "--out", str(root / "shards"), "--scans-per-shard", "3"]) == 0
    return root / "shards"


def stream_ids(volumes: ShardVolumes, **kwargs) -> list[str]:
    return [volumes.scan_ids[int(i)] for _, indices in volumes.batches(workers=2, **kwargs) for i in indices]


def test_every_scan_streams_once_per_epoch_in_a_new_deterministic_order(shards):
    volumes = ShardVolumes(shards, shuffle_shards=2)
    assert len(volumes) == 20 and volumes.shape == SHAPE and len(volumes.shards) == 7  # 6 x 3 + 2
    assert volumes.steps_per_epoch(4) == 5
    ids = stream_ids(volumes, batch_size=4, seed=3, total_steps=15)
    epochs = [ids[k * 20 : (k + 1) * 20] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == [f"scan{i:03d}" for i in range(20)]  # all, once
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # reshuffled per epoch
    assert ids == stream_ids(
        ShardVolumes(shards, shuffle_shards=2), batch_size=4, seed=3, total_steps=15
    )  # deterministic
    assert ids != stream_ids(volumes, batch_size=4, seed=4, total_steps=15)  # seeded
    # Scans mix across the shards of a group: not one shard's scans in a row.
    first_shards = [int(s[4:]) // 3 for s in epochs[0][:6]]
    assert len(set(first_shards)) > 1
    # The volumes are the store's, bit for bit.
    store = Store(shards.parent / "store")
    for hu, indices in volumes.batches(4, workers=2, total_steps=2):
        for row, index in enumerate(indices.tolist()):
            assert hu.dtype == torch.int16 and hu.shape == (4, 1, *SHAPE)
            assert np.array_equal(hu[row, 0].numpy(), store.read(volumes.scan_ids[index]))


def test_ranks_share_each_epoch_without_overlap(shards):
    volumes = ShardVolumes(shards, shuffle_shards=2)
    steps = volumes.steps_per_epoch(2, world_size=2)
    assert steps == 4  # the rank with the 3 smallest of 7 shards (3 + 3 + 2 scans) fills 4 batches of 2
    for epoch in range(3):
        ranks = [volumes.epoch_order(epoch, 2, seed=1, rank=r, world_size=2) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == 8 and not set(ranks[0]) & set(ranks[1])
        assert stream_ids(
            volumes,
            batch_size=2,
            seed=1,
            rank=1,
            world_size=2,
            start_step=epoch * steps,
            total_steps=(epoch + 1) * steps,
        ) == [volumes.scan_ids[i] for i in ranks[1]]
    with pytest.raises(InputError, match="7 shards cannot feed 8 ranks"):
        volumes.steps_per_epoch(1, world_size=8)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
@pytest.mark.parametrize("start_step", [3, 5, 11])  # mid-epoch, on an epoch boundary, in a later epoch
def test_a_resumed_stream_yields_exactly_the_rest_of_the_uninterrupted_one(shards, rank, world_size, start_step):
    volumes = ShardVolumes(shards, shuffle_shards=2)
    order = dict(batch_size=2, seed=7, rank=rank, world_size=world_size)
    whole = stream_ids(volumes, total_steps=14, **order)
    resumed = stream_ids(ShardVolumes(shards, shuffle_shards=2), start_step=start_step, total_steps=14, **order)
    assert len(whole) == 28 and resumed == whole[2 * start_step :]


def test_shards_stream_from_a_url(shards):
    # The form of object storage: a command that writes the shard to stdout (aws s3 cp s3://... -).
    url = f"pipe:cat {shards}/{{shard}}"
    assert stream_ids(ShardVolumes(shards, url=url), batch_size=4, total_steps=5) == stream_ids(
        ShardVolumes(shards), batch_size=4, total_steps=5
    )
    with pytest.raises(ConfigError, match="no {shard}"):
        ShardVolumes(shards, url="pipe:cat shards/x.tar")


def test_pack_resumes_and_repacks_to_the_same_bytes(tmp_path, shards):
    store = shards.parent / "store"
    first = {p.name: p.read_bytes() for p in shards.iterdir()}
    out = tmp_path / "again"
    summary = pack_store(store, out, scans_per_shard=3, progress=False)
    assert summary.written == 7 and summary.scans == 20 and summary.codec == "lz4hc"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # reproducible to the byte
    (out / "shard-000004.tar").unlink()  # "killed" before this shard was written
    (out / INDEX_FILE).unlink()
    summary = pack_store(store, out, scans_per_shard=3, progress=False)
    assert (summary.written, summary.reused) == (1, 6)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    summary = pack_store(store, out, scans_per_shard=3, codec="zstd", progress=False)  # another codec: all new
    assert summary.written == 7 and ShardVolumes(out).shape == SHAPE
    with pytest.raises(ConfigError, match="shards hold compressed volumes"):
        pack_store(store, out, codec="npy")


def test_a_damaged_shard_is_named(tmp_path, shards):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = (copy / "shard-000002.tar").read_bytes()
    (copy / "shard-000002.tar").write_bytes(data[:1200])  # inside its second member (tar pads the end)
    with pytest.raises(ScanError, match=r"shard-000002\.tar: (cannot read the shard|does not hold the 3 scans)"):
        stream_ids(ShardVolumes(copy, shuffle_shards=7), batch_size=4, total_steps=5)
    with pytest.raises(InputError, match="not a shard folder"):
        ShardVolumes(tmp_path)
    (copy / INDEX_FILE).write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a shard index fmct can read"):
        ShardVolumes(copy)


# Depth 2, width 32, 16^3 crops (the tiny CPU configuration of test_pretrain, smaller).
TINY = [
    "model.size=tiny",
    "model.depth=2",
    "model.embed_dim=32",
    "model.n_heads=2",
    "model.img_size=16",
    "model.patch_size=8",
    "model.n_registers=0",
    "augment.global_size=16",
    "augment.local_size=8",
    "augment.n_local=2",
    "dino.n_prototypes=64",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=16",
    "optim.batch_size=2",
    "optim.epoch_length=3",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "engine.device=cpu",
    "engine.workers=1",
    "engine.progress=false",
    "engine.log_every=1",
    "engine.checkpoint_every=2",
    "engine.deterministic=true",
]


def test_pretraining_streams_shards_and_resumes_to_the_same_weights(tmp_path, capsys):
    make_store(tmp_path / "store", n=10, shape=(24, 24, 24))
    assert (
        main(["store", "pack", str(tmp_path / "store"), "--out", str(tmp_path / "shards"), "--scans-per-shard", "2"])
        == 0
    )
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert pretrain(tmp_path / "shards", whole, load_config(PretrainConfig, None, TINY))["step"] == 6
    stopped = pretrain(tmp_path / "shards", halves, load_config(PretrainConfig, None, TINY + ["engine.stop_at_step=4"]))
    assert stopped["step"] == 4
    assert main(["pretrain", "--store", str(tmp_path / "shards"), "--out", str(halves), *TINY]) == 0
    assert "resuming" in capsys.readouterr().err
    expected, actual = read_checkpoint(whole / "checkpoint.pt"), read_checkpoint(halves / "checkpoint.pt")
    assert actual["step"] == expected["step"] == 6
    for name, tensor in expected["student"].items():
        assert torch.equal(tensor, actual["student"][name]), name
    assert (
        main(
            [
                "pretrain",
                "--store",
                str(tmp_path / "shards"),
                "--out",
                str(tmp_path / "x"),
                *TINY,
                "data.exclude_sites=[C]",
                "data.labels=labels.csv",
            ]
        )
        == 2
    )
    assert "holds no sources" in capsys.readouterr().err


def test_pretraining_from_an_unreachable_shard_exits_1_in_one_line(tmp_path, capsys):
    make_store(tmp_path / "store", n=4, shape=(24, 24, 24))
    assert (
        main(["store", "pack", str(tmp_path / "store"), "--out", str(tmp_path / "shards"), "--scans-per-shard", "2"])
        == 0
    )
    assert (
        main(
            [
                "pretrain",
                "--store",
                str(tmp_path / "shards"),
                "--out",
                str(tmp_path / "run"),
                *TINY,
                "data.shards_url=pipe:false {shard}",
            ]
        )
        == 1
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error == "fmct pretrain: pipe:false shard-000000.tar: cannot read the shard: its command exited with status 1"
        or error
        == "fmct pretrain: pipe:false shard-000001.tar: cannot read the shard: its command exited with status 1"
    )
