"""Synthesis speed: one default-size scan (512 x 512, the site's routine slices) on one core, and a cohort.

Times, after building the canonical head once (the per-process start-up, reported separately):
- per scan: drawing the subject (anatomy + pathologies in the template frame) and reconstructing its
  routine series (warp onto the scanner grid, slabs, kernel, noise), for each site;
- writing: a small cohort as DICOM series with --workers 1, cases per second.
CPU time of the process is reported beside wall time (other load on the machine inflates wall time).
Prints one JSON line of figures.

    OMP_NUM_THREADS=1 python benchmarks/synth.py [--scans 6] [--cohort 4] [--out /tmp/fmct-bench-synth]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from fmct.synth import Subject, generate_cohort
from fmct.synth.anatomy import head_template


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6, help="scans timed (sites cycle A, B, C)")
    parser.add_argument("--cohort", type=int, default=4, help="cases of the DICOM cohort timed")
    parser.add_argument("--out", default="/tmp/fmct-bench-synth")
    args = parser.parse_args()

    with threadpool_limits(limits=1):
        _, template_s, _ = _timed(head_template)
        subject_s, scan_s, cpu_s, shapes = [], [], [], []
        for index in range(args.scans):
            subject, wall_subject, cpu_subject = _timed(lambda: Subject(index, "ABC"[index % 3]))
            scan, wall_scan, cpu_scan = _timed(lambda: subject.scan(subject.acquisition("routine")))
            subject_s.append(wall_subject)
            scan_s.append(wall_scan)
            cpu_s.append(cpu_subject + cpu_scan)
            shapes.append(list(scan.hu.shape))

        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        _, cohort_s, cohort_cpu_s = _timed(lambda: generate_cohort(out, n=args.cohort, fmt="dicom", seed=0, workers=1))
        dicom_mb = sum(p.stat().st_size for p in out.rglob("*.dcm")) / 1e6
        shutil.rmtree(out, ignore_errors=True)

    total = np.add(subject_s, scan_s)
    print(
        json.dumps(
            {
                "benchmark": "synth",
                "machine": platform.processor() or platform.machine(),
                "threads": 1,
                "template_build_s": round(template_s, 2),
                "scan_shapes": shapes,
                "subject_s_median": round(float(np.median(subject_s)), 3),
                "reconstruct_s_median": round(float(np.median(scan_s)), 3),
                "scan_total_s_median": round(float(np.median(total)), 3),
                "scan_total_s_max": round(float(np.max(total)), 3),
                "scan_cpu_s_median": round(float(np.median(cpu_s)), 3),
                "cohort_cases": args.cohort,
                "cohort_dicom_s_per_case": round(cohort_s / args.cohort, 3),
                "cohort_cpu_s_per_case": round(cohort_cpu_s / args.cohort, 3),
                "cohort_dicom_mb_per_case": round(dicom_mb / args.cohort, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
