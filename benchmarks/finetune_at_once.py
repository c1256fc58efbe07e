"""Fine-tunes two at a time, one core each, against one after the other on all cores: the demo's
``stages_at_once`` (:func:`fmct.demo.run_at_once`), both sides in the same run on the same store.

The store: ``--scans`` synthetic heads (sites A and B, NIfTI, 64^3 x 3 mm, as the demo's). Each fit is
``fmct finetune --model scratch --like fmct-synth-tiny`` on all training labels with the demo's views
(whole volumes, flips) and ``--steps`` steps, no validation check before the last step, so that both
sides train exactly the same number of steps; each fit ends by predicting its splits, as the demo's do.

Figures: ``reference_steps_per_s``, two fits one after the other, each on every core (the demo until
2026-12-07); ``at_once_steps_per_s``, the same two fits at the same time, each on its share of the
cores; their ratio. Prints one JSON line.

    python benchmarks/finetune_at_once.py [--scans 48] [--steps 60] [--out /tmp/fmct-bench-at-once]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from fmct.config import IngestConfig, load_config
from fmct.demo import run_at_once, usable_cores
from fmct.ingest import ingest
from fmct.synth import generate_cohort

VIEWS = ["head=pooled", "crop_scale=[1,1]", "flip_prob=[0.5,0.5,0.5]", "rotation_deg=0", "intensity_prob=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=48)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/fmct-bench-at-once")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.environ["FMCT_KEY_FILE"] = str(out / "pseudonym.key")  # this store's own key, for every fit's process too
    generate_cohort(out / "cohort", n=args.scans, sites=("A", "B"), fmt="nifti", seed=11, workers=2, matrix=64)
    config = load_config(IngestConfig, None, ["canonical.shape=[64,64,64]", "canonical.spacing_mm=3.0"])
    ingest([out / "cohort" / "nifti"], out / "store", config, workers=2, progress=False)

    def fit(name: str) -> list[str]:
        return [
            "finetune",
            "--store",
            str(out / "store"),
            "--labels",
            str(out / "cohort" / "labels.csv"),
            "--model",
            "scratch",
            "--like",
            "fmct-synth-tiny",
            "--findings",
            "ich",
            "--label-fractions",
            "1",
            "--seeds",
            "1",
            "--max-steps",
            str(args.steps),
            "--batch-size",
            "8",
            "--out",
            str(out / name),
            f"eval_every={args.steps}",
            f"patience={args.steps}",
            *VIEWS,
        ]

    began = time.monotonic()
    assert run_at_once([[fit("one_after_a"), fit("one_after_b")]], at_once=1, logs=out / "logs") == 0
    reference = time.monotonic() - began
    began = time.monotonic()
    assert run_at_once([[fit("at_once_a")], [fit("at_once_b")]], at_once=2, logs=out / "logs") == 0
    at_once = time.monotonic() - began
    steps = 2 * args.steps
    print(
        json.dumps(
            {
                "benchmark": "finetune_at_once",
                "machine": f"{platform.machine()}, {usable_cores()} cores",
                "scans": args.scans,
                "steps_per_fit": args.steps,
                "reference_steps_per_s": round(steps / reference, 3),
                "at_once_steps_per_s": round(steps / at_once, 3),
                "at_once_vs_reference": round(reference / at_once, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
