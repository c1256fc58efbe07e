"""The compressed store: lossless codecs, one reader for every format, and `fmct store migrate`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fmct import codec
from fmct.cli import main
from fmct.data import StoreVolumes
from fmct.errors import ConfigError, ScanError
from fmct.store import Store, migrate, rebuild_tables, write_scan

COMPRESSED = list(codec.BLOSC2_CODECS)


def volume_bytes(store: Store) -> int:
    return sum(store.scan_file(s).stat().st_size for s in store.scan_ids)


def make_store(path: Path, codec_name: str, n: int = 3, shape=(9, 7, 5)) -> dict[str, np.ndarray]:
    """``n`` scans of int16 values over the whole int16 range, written in ``codec_name``."""
    rng = np.random.default_rng(5)
    volumes = {}
    for i in range(n):
        hu = rng.integers(-32768, 32768, size=shape, dtype=np.int16)
        hu[0, 0, 0], hu[-1, -1, -1] = -32768, 32767
        write_scan(path, hu, {"scan_id": f"s{i}", "store_shape": list(shape)}, codec=codec_name)
        volumes[f"s{i}"] = hu
    rebuild_tables(path)
    return volumes


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("shape", [(9, 7, 5), (130, 6, 4), (1, 1, 1)])
def test_every_codec_round_trips_bit_for_bit(name, shape):
    rng = np.random.default_rng(0)
    hu = rng.integers(-32768, 32768, size=shape, dtype=np.int16)
    data = codec.encode(hu, name)
    assert codec.codec_of(data) == name
    decoded = codec.decode(data)
    assert decoded.dtype == np.int16 and decoded.tobytes() == hu.tobytes()
    out = np.full(shape, 7, np.int16)
    assert codec.decode(data, out) is out and np.array_equal(out, hu)
    with pytest.raises(ValueError, match="expected int16"):
        codec.decode(data, np.empty((2, 2, 2), np.int16))


def test_damaged_bytes_are_a_value_error_not_a_crash():
    data = codec.encode(np.arange(600, dtype=np.int16).reshape(10, 6, 10), "lz4hc")
    for damaged in (b"", b"not a volume file", data[: len(data) // 2]):
        with pytest.raises(ValueError, match="not a volume file"):
            codec.decode(damaged)
    with pytest.raises(ConfigError, match="unknown codec 'gzip'"):
        codec.check_codec("gzip")


def test_a_synth_head_store_is_smaller_in_every_codec_and_reads_the_same_hu(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "cohort"), "--n", "2", "--format", "nifti", "--matrix", "128"]) == 0
    raw = tmp_path / "raw"
    assert main(["ingest", str(tmp_path / "cohort" / "nifti"), "--out", str(raw), "store.codec=npy"]) == 0
    reference = Store(raw)
    assert all(reference.scan_file(s).suffix == ".npy" for s in reference.scan_ids)
    default = tmp_path / "default"
    assert main(["ingest", str(tmp_path / "cohort" / "nifti"), "--out", str(default)]) == 0
    store = Store(default)
    assert yaml.safe_load((default / "config.yaml").read_text())["store"]["codec"] == codec.DEFAULT_CODEC == "lz4hc"
    assert {store.scan_file(s).suffix for s in store.scan_ids} == {".b2nd"}
    ratios = {}
    for name in COMPRESSED:
        path = tmp_path / name
        shutil.copytree(raw, path)
        migrate(path, name, progress=False)
        migrated = Store(path)
        for scan_id in reference.scan_ids:
            hu = migrated.read(scan_id)
            assert hu.dtype == np.int16 and hu.shape == (128, 128, 128)
            assert hu.tobytes() == reference.read(scan_id).tobytes() == store.read(scan_id).tobytes()
        ratios[name] = volume_bytes(reference) / volume_bytes(migrated)
    assert volume_bytes(store) == volume_bytes(Store(tmp_path / codec.DEFAULT_CODEC))
    assert all(ratio > 1.5 for ratio in ratios.values()), ratios
    assert ratios["zstd"] > ratios["lz4hc"] > ratios["lz4"]  # the order fmct.codec documents


def test_an_npy_store_reads_as_before_and_migrates_byte_equal(tmp_path, capsys):
    store_path = tmp_path / "old"
    volumes = {}
    for i in range(3):  # a store as fmct wrote it before compression: np.save files, no store section
        hu = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * (i + 3) - 900).astype(np.int16)
        (store_path / "scans").mkdir(parents=True, exist_ok=True)
        np.save(store_path / "scans" / f"s{i}.npy", hu)
        (store_path / "scans" / f"s{i}.json").write_text(f'{{"scan_id": "s{i}", "store_shape": [6, 5, 4]}}')
        volumes[f"s{i}"] = hu
    (store_path / "config.yaml").write_text("salt: abc\n")  # a store of an older fmct, keys it no longer knows
    rebuild_tables(store_path)
    old = Store(store_path)
    assert all(np.array_equal(old.read(s), volumes[s]) for s in volumes)
    dataset = StoreVolumes(store_path)
    assert np.array_equal(dataset[1][0][0].numpy(), volumes[dataset.scan_ids[1]])

    assert main(["store", "migrate", str(store_path)]) == 0
    assert "3 scans rewritten in lz4hc, 0 already were" in capsys.readouterr().out
    assert sorted(p.name for p in (store_path / "scans").iterdir()) == [
        f"s{i}.{ext}" for i in range(3) for ext in ("b2nd", "json")
    ]
    new = Store(store_path)
    for scan_id, hu in volumes.items():
        assert new.read(scan_id).tobytes() == hu.tobytes()
    config = yaml.safe_load((store_path / "config.yaml").read_text())
    assert config["store"]["codec"] == "lz4hc" and config["salt"] == "abc"

    assert main(["store", "migrate", str(store_path)]) == 0  # nothing left to do
    assert "0 scans rewritten in lz4hc, 3 already were" in capsys.readouterr().out
    assert main(["store", "migrate", str(store_path), "--codec", "npy"]) == 0  # and back, if need be
    assert all(np.load(store_path / "scans" / f"{s}.npy").tobytes() == hu.tobytes() for s, hu in volumes.items())
    assert yaml.safe_load((store_path / "config.yaml").read_text())["store"]["codec"] == "npy"


def test_an_interrupted_migration_resumes_and_checks_both_files(tmp_path, capsys):
    volumes = make_store(tmp_path, "npy")
    # Killed after s0's new file was renamed into place, before its .npy was removed: both whole.
    codec.write_volume(tmp_path / "scans" / "s0", volumes["s0"], "zstd")
    # s1: a leftover compressed file that does not hold the scan's volume must never win silently.
    codec.write_volume(tmp_path / "scans" / "s1", volumes["s1"] + 1, "zstd")
    summary = migrate(tmp_path, "zstd", progress=False)
    assert summary.rewritten == 1 and summary.already == 1 and len(summary.failed) == 1
    assert summary.failed[0][0] == "s1" and "hold different volumes" in summary.failed[0][1]
    assert not (tmp_path / "scans" / "s0.npy").exists() and (tmp_path / "scans" / "s1.npy").exists()
    store = Store(tmp_path)
    assert (
        store.read("s0").tobytes() == volumes["s0"].tobytes() and store.read("s2").tobytes() == volumes["s2"].tobytes()
    )
    assert main(["store", "migrate", str(tmp_path), "--codec", "zstd"]) == 1
    assert "s1 left as it was" in capsys.readouterr().out


def test_a_migration_killed_with_sigkill_resumes_to_the_same_volumes(tmp_path):
    volumes = make_store(tmp_path, "npy", n=60, shape=(64, 64, 48))
    command = [sys.executable, "-m", "fmct.cli", "store", "migrate", str(tmp_path), "--codec", "zstd"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((tmp_path / "scans").glob("*.b2nd"))) < 5:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    migrated = len(list((tmp_path / "scans").glob("*.b2nd")))
    assert process.returncode == -signal.SIGKILL and 5 <= migrated < 60, "the kill should land mid-store"
    store = Store(tmp_path)
    for scan_id, hu in volumes.items():  # every scan whole, in its old file or its new one
        assert store.read(scan_id).tobytes() == hu.tobytes(), scan_id
    summary = migrate(tmp_path, "zstd", progress=False)
    assert summary.ok and (summary.already, summary.rewritten) == (migrated, 60 - migrated)
    assert not list((tmp_path / "scans").glob("*.npy"))
    assert all(Store(tmp_path).read(s).tobytes() == hu.tobytes() for s, hu in volumes.items())


def test_a_damaged_scan_is_left_as_it_was_and_the_others_migrate(tmp_path):
    volumes = make_store(tmp_path, "npy")
    (tmp_path / "scans" / "s1.npy").write_bytes(b"damaged")
    summary = migrate(tmp_path, "lz4", progress=False)
    assert summary.rewritten == 2 and [s for s, _ in summary.failed] == ["s1"]
    assert "s1.npy: cannot read" in summary.failed[0][1]
    assert (tmp_path / "scans" / "s1.npy").read_bytes() == b"damaged"
    assert Store(tmp_path).read("s2").tobytes() == volumes["s2"].tobytes()


def test_the_reader_names_the_file_and_the_reason(tmp_path):
    make_store(tmp_path, "lz4hc", n=2)
    store = Store(tmp_path)
    (tmp_path / "scans" / "s1.b2nd").write_bytes(codec.encode(np.zeros((3, 3, 3), np.int16), "lz4hc"))
    with pytest.raises(ScanError, match=r"s1\.b2nd: expected int16 \[9, 7, 5\], found int16 \[3, 3, 3\]"):
        store.read("s1")
    with pytest.raises(ScanError, match=r"s1\.b2nd: cannot read: holds int16 \[3, 3, 3\]"):
        store.read("s1", out=np.empty((9, 7, 5), np.int16))
    (tmp_path / "scans" / "s0.b2nd").unlink()
    with pytest.raises(ScanError, match=r"s0\.b2nd: cannot read: .*No such file"):
        store.read("s0")


def test_bad_codecs_are_usage_errors(tmp_path, capsys):
    make_store(tmp_path / "store", "lz4", n=1)
    assert main(["store", "migrate", str(tmp_path / "store"), "--codec", "gzip"]) == 2
    assert "unknown codec 'gzip'" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "store"), "--out", str(tmp_path / "other"), "store.codec=gzip"]) == 2
    assert "store: unknown codec 'gzip'" in capsys.readouterr().err
    assert main(["store", "migrate", str(tmp_path / "nothing")]) == 2
    assert "not an fmct store" in capsys.readouterr().err
