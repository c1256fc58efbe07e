"""Crash-isolated ingest workers: a native abort costs one scan, and kill -9 of ingest ends its workers."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fmct.scans.job
from fmct.config import IngestConfig, load_config
from fmct.ingest import ingest
from fmct.store import Store
from phantoms import write_head

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the death signal is Linux's")
GRID = ["canonical.shape=[48,48,48]", "canonical.spacing_mm=4.5"]


def abort_on(description: str):
    """A series reader that aborts its process natively (SIGABRT, as a C decoder does) for one series."""
    original = fmct.scans.job.read_series

    def read(info, config=None):
        if info.series_description == description:
            faulthandler.disable()  # pytest's handler would print the worker's stack
            os.abort()
        return original(info, config)

    return read


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the hook reaches workers by fork")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_aborts_costs_only_its_scan(tmp_path, monkeypatch, workers):
    for name in ("a", "b", "c"):
        write_head(tmp_path / "in" / name, PatientID=f"P-{name}", SeriesDescription=f"HEAD {name}")
    config = load_config(IngestConfig, None, GRID)
    monkeypatch.setattr(fmct.scans.job, "read_series", abort_on("HEAD b"))
    summary = ingest([tmp_path / "in"], tmp_path / "store", config, workers=workers, progress=False)
    assert (summary.stored, summary.skipped) == (2, 1)  # the batch went on past the crash, in order or not
    (error,) = Store(tmp_path / "store").errors()
    assert error["reason"].startswith("the worker process reading this scan died (killed by SIGABRT)")
    again = ingest([tmp_path / "in"], tmp_path / "store", config, workers=workers, progress=False)
    assert (again.stored, again.skipped_before) == (0, 1)  # not retried on every run
    monkeypatch.undo()
    retried = ingest([tmp_path / "in"], tmp_path / "store", config, workers=workers, retry_failed=True, progress=False)
    assert retried.stored == 1 and Store(tmp_path / "store").errors() == []


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left to collect


# `fmct ingest` whose scans each take a minute: a worker can only end quickly by dying with its parent.
SLOW_INGEST = """
import sys, time
import fmct.scans.job as scan
from fmct.cli import main
original = scan.read_series
def slow(info, config=None):
    time.sleep(60)
    return original(info, config)
scan.read_series = slow
sys.exit(main(sys.argv[1:]))
"""


def test_killing_ingest_with_sigkill_ends_its_workers(tmp_path):
    for index in range(4):
        write_head(tmp_path / "in" / f"s{index}", PatientID=f"P{index}")
    command = [
        sys.executable,
        "-c",
        SLOW_INGEST,
        "ingest",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "store"),
        "--workers",
        "2",
        *GRID,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        workers = _children(process.pid)
        time.sleep(0.05)
    assert len(workers) == 2, "both workers should be running"
    time.sleep(1.0)  # both are inside their minute-long scan now
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "workers outlived the killed ingest"
