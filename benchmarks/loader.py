"""Loader throughput: volumes decoded per second on one core from a compressed store, beside the raw
``.npy`` store they were migrated from, and the compression ratio of each codec.

The store: ``--scans`` synthetic heads (``fmct synth``, NIfTI, matrix 512, sites A, B, C) ingested at
the default canonical grid, 128^3 int16 at 1.5 mm, with codec npy (the uncompressed reference). Each
codec of fmct.codec is a copy of it migrated with ``fmct store migrate``. Everything runs on one
thread (blosc2 nthreads=1, one process), from a warm page cache. "Per core" is volumes per CPU second
of that thread (``time.thread_time``), which other jobs on a shared machine do not distort; a node reads
about cores x that. Wall-clock rates (``..._wall``) are printed beside them.

Figures, for each codec ``C`` of fmct.codec (lz4hc, the default; zstd; lz4) and, as the reference, npy:
- ``C_compression_ratio``: bytes of the .npy volume files / bytes of the codec's files, whole store;
- ``C_decode_volumes_per_s_per_core``: ``Store.read`` of every scan (file read + decode into memory),
  the best of ``--repeats`` passes over the store;
- ``C_encode_volumes_per_s_per_core``: what compression adds to ingest, per volume;
- ``shards_stream_volumes_per_cpu_s``: the shard stream of pretraining (``fmct store pack`` in the
  default codec, two scans per shard; batches of 4, one decoding thread, one more reading the tar
  files) over eight epochs, per CPU second of the whole process (``time.process_time``: every thread);
- ``variants``: other blosc2 parameters in the same layout (ratio, decode and encode volumes/s), the
  measurements the codec table of fmct.codec was chosen from.
The un-prefixed ``compression_ratio`` and ``decode_volumes_per_s_per_core`` are the default codec's.
Target (issue 13): at least 2x smaller and at least 150 volumes/s per core. Prints one JSON line.

    python benchmarks/loader.py [--scans 8] [--repeats 5] [--out /tmp/fmct-bench-loader]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import blosc2
import numpy as np
import torch

from fmct.cli import main as fmct
from fmct.codec import BLOSC2_CODECS, DEFAULT_CODEC, compress, decode, encode
from fmct.data.shards import ShardVolumes, pack_store
from fmct.store import Store, migrate

# Other blosc2 parameters, in fmct's layout (one chunk, blocks of whole planes), one thread.
VARIANTS = {
    "zstd1_shuffle": dict(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE]),
    "zstd5_shuffle": dict(codec=blosc2.Codec.ZSTD, clevel=5, filters=[blosc2.Filter.SHUFFLE]),
    "zstd1_bitshuffle": dict(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.BITSHUFFLE]),
    "zstd3_bitshuffle": dict(codec=blosc2.Codec.ZSTD, clevel=3, filters=[blosc2.Filter.BITSHUFFLE]),
    "zstd1_shuffle_bytedelta": dict(
        codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE, blosc2.Filter.BYTEDELTA]
    ),
    "lz4_bitshuffle": dict(codec=blosc2.Codec.LZ4, clevel=5, filters=[blosc2.Filter.BITSHUFFLE]),
    "lz4hc5_bitshuffle": dict(codec=blosc2.Codec.LZ4HC, clevel=5, filters=[blosc2.Filter.BITSHUFFLE]),
    "lz4hc9_shuffle": dict(codec=blosc2.Codec.LZ4HC, clevel=9, filters=[blosc2.Filter.SHUFFLE]),
}
TARGET_RATIO, TARGET_PER_CORE = 2.0, 150.0


def build_reference_store(out: Path, n_scans: int) -> Path:
    """The npy store of ``n_scans`` synthetic heads at 128^3 (reused when already there)."""
    store = out / "store-npy"
    if store.exists() and len(Store(store)) == n_scans:
        return store
    shutil.rmtree(out, ignore_errors=True)
    # The two public verbs, as a user runs them: `fmct synth`, then `fmct ingest` with codec npy.
    assert (
        fmct(
            [
                "synth",
                "--out",
                str(out / "cohort"),
                "--n",
                str(n_scans),
                "--format",
                "nifti",
                "--seed",
                "13",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert (
        fmct(["ingest", str(out / "cohort" / "nifti"), "--out", str(store), "--workers", "2", "store.codec=npy"]) == 0
    )
    assert len(Store(store)) == n_scans
    return store


def volume_bytes(store: Store) -> int:
    return sum(store.scan_file(scan_id).stat().st_size for scan_id in store.scan_ids)


def best_rates(passes: int, items: int, run, cpu_clock=time.thread_time) -> tuple[float, float]:
    """(items per CPU second of ``cpu_clock``, items per wall second), each from the fastest of ``passes``
    runs of ``run()``, the one least disturbed by other load."""
    cpu, wall = float("inf"), float("inf")
    for _ in range(passes):
        cpu_started, started = cpu_clock(), time.perf_counter()
        run()
        cpu, wall = min(cpu, cpu_clock() - cpu_started), min(wall, time.perf_counter() - started)
    return items / cpu, items / wall


def measure_store(store: Store, repeats: int) -> tuple[float, float]:
    """Volumes per CPU second and per wall second of Store.read over the whole store (page cache)."""
    out = np.empty(Store(store.path).read(0).shape, np.int16)

    def read_all() -> None:
        for scan_id in store.scan_ids:
            store.read(scan_id, out=out)

    read_all()  # page cache
    return best_rates(repeats, len(store), read_all)


def measure_variant(volumes: list[np.ndarray], cparams: dict, repeats: int) -> dict:
    params = dict(cparams, nthreads=1)
    frames = [compress(hu, params) for hu in volumes]
    assert all(np.array_equal(decode(f), hu) for f, hu in zip(frames, volumes))  # lossless
    out = np.empty_like(volumes[0])
    decode_rate, _ = best_rates(repeats, len(frames), lambda: [decode(f, out) for f in frames])
    encode_rate, _ = best_rates(max(1, repeats // 2), len(volumes), lambda: [compress(hu, params) for hu in volumes])
    return {
        "compression_ratio": round(sum(v.nbytes for v in volumes) / sum(map(len, frames)), 3),
        "decode_volumes_per_s_per_core": round(decode_rate, 1),
        "encode_volumes_per_s_per_core": round(encode_rate, 1),
    }


def rounded(rates: tuple[float, float], name: str) -> dict:
    return {f"{name}_per_core": round(rates[0], 1), f"{name}_wall": round(rates[1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fmct-bench-loader"))
    args = parser.parse_args()
    blosc2.set_nthreads(1)
    torch.set_num_threads(1)

    with contextlib.redirect_stdout(sys.stderr):  # the verbs' own summaries: stdout is the JSON line's
        reference = Store(build_reference_store(args.out, args.scans))
    volumes = [reference.read(scan_id) for scan_id in reference.scan_ids]
    raw_bytes = volume_bytes(reference)
    figures = {
        "benchmark": "loader",
        "volume": f"{list(volumes[0].shape)} int16",
        "scans": len(volumes),
        "default_codec": DEFAULT_CODEC,
        **rounded(measure_store(reference, args.repeats), "npy_decode_volumes_per_s"),
    }
    for codec in BLOSC2_CODECS:
        path = args.out / f"store-{codec}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(reference.path, path)
        migrate(path, codec, progress=False)
        store = Store(path)
        assert all(np.array_equal(store.read(s), reference.read(s)) for s in store.scan_ids)  # lossless
        figures[f"{codec}_compression_ratio"] = round(raw_bytes / volume_bytes(store), 3)
        figures.update(rounded(measure_store(store, args.repeats), f"{codec}_decode_volumes_per_s"))
        figures[f"{codec}_encode_volumes_per_s_per_core"] = round(
            best_rates(max(1, args.repeats // 2), len(volumes), lambda: [encode(hu, codec) for hu in volumes])[0], 1
        )

    shards = args.out / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    pack_store(args.out / f"store-{DEFAULT_CODEC}", shards, scans_per_shard=2, progress=False)
    stream = ShardVolumes(shards, shuffle_shards=2)
    steps = 8 * stream.steps_per_epoch(4)
    cpu_rate, wall_rate = best_rates(
        args.repeats,
        4 * steps,
        lambda: sum(1 for _ in stream.batches(4, workers=1, total_steps=steps, pin_memory=False)),
        cpu_clock=time.process_time,
    )
    figures["shards_stream_volumes_per_cpu_s"], figures["shards_stream_volumes_per_s_wall"] = (
        round(cpu_rate, 1),
        round(wall_rate, 1),
    )

    figures["variants"] = {name: measure_variant(volumes, cparams, args.repeats) for name, cparams in VARIANTS.items()}
    figures["compression_ratio"] = figures[f"{DEFAULT_CODEC}_compression_ratio"]
    figures["decode_volumes_per_s_per_core"] = figures[f"{DEFAULT_CODEC}_decode_volumes_per_s_per_core"]
    figures["target"] = {"compression_ratio": TARGET_RATIO, "decode_volumes_per_s_per_core": TARGET_PER_CORE}
    figures["meets_target"] = bool(
        figures["compression_ratio"] >= TARGET_RATIO and figures["decode_volumes_per_s_per_core"] >= TARGET_PER_CORE
    )
    figures["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, one thread used; blosc2 {blosc2.__version__}"
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine, for the record
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
