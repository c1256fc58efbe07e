"""Label efficiency of the shipped foundation checkpoint against scratch and the two floors.

Runs ``fmct demo`` on a larger synthetic cohort of its own seed (660 scans: 440 of sites A and B, 220 of
the held-out site C), findings ich, sdh and fracture, 2 seeds, then prints one JSON line: AUROC [95% CI]
per arm x finding x fraction x group (ID / OOD), the paired pretrained-minus-scratch,
pretrained-probe-minus-floor and pretrained-minus-ceiling differences, how every fine-tuned fit ended,
the pretraining budget of the pretrained arm, and the wall time. Arms: pretrained linear probe and the
two floors (random-init, HU histogram) at 1 %, 10 % and 100 % of the training labels; pretrained and
scratch fine-tunes at 1 % and 10 %; the ceiling (scratch, 100 %). Every fine-tune ends by early
stopping under the demo's one recipe. About 13 minutes on 2 CPU cores (BENCHMARKS.md).

    python benchmarks/label_efficiency.py [--out bench_out/label_efficiency] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import yaml

from fmct.cli import main as fmct
from fmct.eval.evaluate import FLOORS, arm_effects, ceiling_effects, pretraining_effects, read_evaluation
from fmct.hub import training_log
from fmct.ssl.release import RECIPE_FILE, wall_seconds
from fmct.tables import read_jsonl

SETTINGS = [
    "n_scans=660",
    "seed=7",
    "test_fraction=0.3",
    "findings=ich,sdh,fracture",
    "label_fractions=0.01,0.1,1",
    "finetune_label_fractions=0.01,0.1",
    "finetune_findings=ich,sdh,fracture",
    "seeds=2",
    "finetune_seeds=2",
]
FOUNDATION = "fmct-synth-tiny"  # the demo's default pretrained arm


def pretraining_budget(model: str) -> dict:
    """Steps, volume passes and training minutes of ``model``'s pretraining, from its log.jsonl and recipe."""
    log = training_log(model)
    records = read_jsonl(log)
    batch = yaml.safe_load((log.parent / RECIPE_FILE).read_text())["optim"]["batch_size"]
    steps = max(r["step"] for r in records)
    return {
        "model": model,
        "steps": steps,
        "batch": batch,
        "volume_passes": steps * batch,
        "training_minutes": round(wall_seconds(records, batch) / 60, 1),
    }


def _number(value):
    # Strict JSON has no NaN: a p-value that was not adjusted (p_holm of a ceiling effect) is null.
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/label_efficiency")
    parser.add_argument("overrides", nargs="*", help="more fmct demo overrides")
    args = parser.parse_args()
    start = time.perf_counter()
    status = fmct(["demo", "--out", args.out, *SETTINGS, *args.overrides])
    if status != 0:
        return status
    evaluation = read_evaluation(Path(args.out) / "evaluation")
    cells = [
        {key: row[key] for key in ("model", "arm", "finding", "label_fraction", "group", "n_scans", "n_pos")}
        | {key: round(float(row[key]), 3) for key in ("auroc", "auroc_lo", "auroc_hi")}
        for row in evaluation.metrics
    ]
    effects = [dict(e, versus="scratch") for e in pretraining_effects(evaluation.comparisons)]
    for floor in FLOORS:
        effects += [dict(e, versus=floor) for e in arm_effects(evaluation.comparisons, floor, same_model=False)]
    effects += [dict(e, versus="ceiling") for e in ceiling_effects(evaluation.comparisons)]
    print(
        json.dumps(
            {
                "benchmark": "label_efficiency",
                "settings": SETTINGS + args.overrides,
                "machine": platform.processor() or platform.machine(),
                "wall_s": round(time.perf_counter() - start, 1),
                "pretraining": pretraining_budget(FOUNDATION),
                "fits": [
                    {k: fit[k] for k in ("model", "arm", "label_fraction", "seed", "ended_by", "steps", "best_step")}
                    for fit in evaluation.fits
                    if fit["steps"] is not None  # fine-tuned fits; a probe has no steps
                ],
                "auroc": cells,
                "effects": [{k: _number(v) for k, v in e.items()} for e in effects],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
