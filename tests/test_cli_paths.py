"""Path and config errors on the command line: one line naming the path and the reason, exit 2, and
nothing made or read before it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmct.cli import main


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder")
    return path


def one_line_exit_2(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fmct {argv[0]}: ") and "Traceback" not in err, err
    for part in expected:
        assert part in err, (part, err)
    return err


def test_out_naming_a_file_or_a_path_under_a_file(tmp_path, a_file, capsys):
    source = tmp_path / "in"
    source.mkdir()
    one_line_exit_2(capsys, ["ingest", str(source), "--out", str(a_file)], str(a_file), "is a file")
    one_line_exit_2(capsys, ["ingest", str(source), "--out", str(a_file / "store")], f"{a_file} is a file")
    one_line_exit_2(capsys, ["synth", "--out", str(a_file), "--n", "1"], str(a_file), "is a file")
    one_line_exit_2(capsys, ["synth", "--out", str(a_file / "cohort"), "--n", "1"], f"{a_file} is a file")
    # evaluate checks --out before it reads anything: the predictions folder need not even exist
    one_line_exit_2(capsys, ["evaluate", "--predictions", str(tmp_path / "none"), "--out", str(a_file)], "is a file")
    report_dir = tmp_path / "report_dir"
    report_dir.mkdir()
    one_line_exit_2(capsys, ["report", str(tmp_path / "none"), "--out", str(report_dir)], "is a folder")
    one_line_exit_2(
        capsys, ["report", str(tmp_path / "none"), "--out", str(a_file / "report.html")], f"{a_file} is a file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt", "in", "report_dir"]  # nothing made
    assert list(report_dir.iterdir()) == []


@pytest.mark.parametrize("verb", ["evaluate", "report"])
@pytest.mark.parametrize("resamples", ["0", "-5"])
def test_bootstrap_needs_a_positive_number_of_resamples(tmp_path, capsys, verb, resamples):
    inputs = ["--predictions", str(tmp_path / "none")] if verb == "evaluate" else [str(tmp_path / "none")]
    out = tmp_path / ("evaluation" if verb == "evaluate" else "report.html")
    one_line_exit_2(
        capsys,
        [verb, *inputs, "--out", str(out), "--bootstrap", resamples],
        f"--bootstrap must be a positive number of resamples, got {resamples}",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("canonical.interpolation=cubic", "canonical: interpolation must be 'linear' or 'nearest', got 'cubic'"),
        ("selection.series=x", "selection: series must be 'preferred' or 'all', got 'x'"),
        ("canonical.spacing_mm=-1", "canonical: spacing_mm must be in (0, 20] mm"),
        ("selection.thickness_range_mm=[5,1]", "selection: thickness_range_mm must be [low, high] mm"),
        ("selection.max_gap_ratio=0.5", "selection: max_gap_ratio must be above 1"),
        ("canonical.shape=[64,64,4]", "canonical: shape must be 3 whole numbers of voxels, each at least 8"),
    ],
)
def test_ingest_config_errors_before_any_work(tmp_path, capsys, override, message):
    (tmp_path / "in").mkdir()
    one_line_exit_2(capsys, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "store"), override], message)
    assert not (tmp_path / "store").exists()


def test_workers_below_one(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    one_line_exit_2(
        capsys,
        ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "store"), "--workers", "0"],
        "--workers must be at least 1",
    )
    assert not (tmp_path / "store").exists()
