"""``fmct demo``: the whole data flow on a synthetic multi-site cohort, each stage one public verb, ending
with what pretraining buys and the claim checked part by part.

The stages (each resumes, so a re-run continues where it stopped): synth, ingest, the demo's own short
pretraining (stopped half-way and resumed, to show the verb; it is not evaluated), embed and probe of
the pretrained backbone and of the two floors (a random-init backbone of the same shape, the HU
histogram), fine-tuning from the pretrained backbone and from scratch at the small label budgets, the
supervised ceiling (scratch on all training labels), evaluate and report. Every fine-tuned arm has the
same recipe and ends by early stopping on the validation AUROC; the step cap only guards against a fit
that never stops.

The verbs run through the command line's own entry point, passed in as ``run_verb``: this module sits
beside the CLI, which imports it, and never imports the CLI back. The fits (each seed of each fine-tuned
arm, and the ceiling), which are independent of each other and take most of the demo's time, run at the
same time (with the probes) as ``python -m fmct.cli`` processes, each on its share of the CPU cores
(:func:`run_at_once`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fmct.config import load_config, save_config
from fmct.errors import ConfigError
from fmct.log import logger


@dataclass
class DemoConfig:
    """``fmct demo``'s settings, sized for a 2-core laptop; ``--scale large`` (:data:`DEMO_SCALES`) is a
    GPU-sized run. Every stage is a public verb and resumes."""

    n_scans: int = 360  # cases cycle through the sites: 240 in-distribution (A, B), 120 held out (C)
    sites: str = "A,B,C"
    ood_sites: str = "C"  # held out: its scans are test-only, the out-of-distribution set
    # Shares of the scans in the validation and test splits, written by synth into labels.csv's split
    # column: each case draws its split from its own seed, so the split is the same on every machine (a
    # split made after ingest would follow the pseudonyms, whose key is drawn on each machine). 0.45 of
    # the 240 in-distribution scans gives an ID test split of about 108 scans, about 36 with a bleed.
    val_fraction: float = 0.15
    test_fraction: float = 0.45
    matrix: int = 128  # DICOM matrix of the synthetic series (2 mm pixels, finer than the 3 mm store)
    workers: int = 2
    seed: int = 0
    store_shape: int = 64  # canonical cube, voxels per side
    store_spacing_mm: float = 3.0  # 64 x 3 mm = the same 192 mm field of view as the 128 x 1.5 mm default
    # The pretrained arm: a shipped checkpoint (pretrained on other synthetic heads, never on site C) or
    # empty for the demo's own pretraining run. The demo's own run always happens, to show the verb.
    foundation_model: str = "fmct-synth-tiny"
    pretrain_config: str = "pretrain_demo"  # a config shipped in fmct/configs, or a YAML path
    pretrain: list[str] = field(default_factory=list)  # overrides on top of it, e.g. optim.epochs=20
    pretrain_stop_at_step: int = 10  # the first pretrain call stops here; the second resumes it
    label_fractions: str = "0.1,0.3,1"  # the probes' budgets (a probe costs seconds)
    # The fine-tuned twins' budgets; the ceiling is fine-tuned from scratch on all training labels besides.
    finetune_label_fractions: str = "0.1"
    seeds: int = 2  # of the probes; a probe costs seconds
    # Of the fine-tuned twins, whose AUROCs are averaged over seeds: one fit's test AUROC moves by up to
    # 0.2 with its seed (BENCHMARKS.md, "Backbones", fourth search), more than the effect the claim looks
    # for. Two seeds, not three, for the demo's time (BENCHMARKS.md, "The demo on the chosen seed"); the
    # ceiling has one.
    finetune_seeds: int = 2
    # Findings common enough to have test positives at every site (the rest are rarer).
    findings: str = "ich,midline_shift"
    # The fine-tuned arms learn the claim's finding alone: class-balanced batches over two findings would
    # give it half the rows, and early stopping would follow the mean of both.
    finetune_findings: str = "ich"
    # Every fine-tuned arm (pretrained, scratch, ceiling) with the same recipe, ended by early stopping:
    # validation AUROC every `finetune_eval_every` steps, stop after `finetune_patience` checks without a
    # better one. `finetune_max_steps` is a guard that should never end a fit (each fit records what did).
    # Patience 4, chosen by a rule set before the runs: the best score on two validation-only cohorts
    # (A/B and site D heads) of ten traced fits among the patiences that keep the demo within 9.5 minutes
    # on 2 cores (BENCHMARKS.md, "The demo's patience"); 10 checks took it to 12 minutes.
    finetune_max_steps: int = 2000
    finetune_eval_every: int = 12
    finetune_patience: int = 4
    # Validation starts at this step (FinetuneConfig.min_steps): from scratch the best of the first checks
    # on 33 validation scans is often luck, and a fit stopped there never trained (a scratch twin and the
    # ceiling kept their weights of step 12 before this).
    finetune_min_steps: int = 120
    finetune_batch_size: int = 8
    # How many of the independent stages (every fit, the probes) run at once, each in its own process on
    # an even share of the cores. On 2 CPU cores two fits on one core each train 1.2-1.3x the
    # steps per second of one fit on both (benchmarks/finetune_at_once.py; BENCHMARKS.md, "The demo, the
    # same on every machine"); on one GPU the fits would share the device, so the large preset runs one
    # stage at a time.
    stages_at_once: int = 2
    # The recipe chosen on validation for the CPU-scale backbone (BENCHMARKS.md, "Backbones", fourth
    # search: three seeds, and a 200-head selection cohort beside the validation split): a linear head on
    # the CLS and the mean and max of the patch tokens; AdamW 1e-3 for every layer, weight decay 1e-4, no
    # warm-up and no gradient clipping; whole-volume views flipped on each axis (rotations and intensity
    # jitter hid the faint bleeds).
    finetune: list[str] = field(
        default_factory=lambda: [
            "head=pooled",
            "lr=0.001",
            "layer_decay=1.0",
            "weight_decay=0.0001",
            "warmup_steps=0",
            "grad_clip=0",
            "crop_scale=[1,1]",
            "flip_prob=[0.5,0.5,0.5]",
            "rotation_deg=0",
            "intensity_prob=0",
        ]
    )

    def __post_init__(self) -> None:
        shares = (self.val_fraction, self.test_fraction)
        if self.n_scans < 20 or min(shares) <= 0 or sum(shares) >= 1:
            raise ConfigError("n_scans must be >= 20, val_fraction and test_fraction > 0 with a sum below 1")
        if (
            min(
                self.seeds,
                self.finetune_seeds,
                self.workers,
                self.finetune_max_steps,
                self.finetune_eval_every,
                self.finetune_patience,
                self.stages_at_once,
            )
            < 1
        ):
            raise ConfigError(
                "seeds, finetune_seeds, workers, finetune_max_steps, finetune_eval_every, finetune_patience "
                "and stages_at_once must be >= 1"
            )


# Presets for ``fmct demo --scale``: overrides applied before the user's own.
DEMO_SCALES: dict[str, list[str]] = {
    "small": [],
    "large": [
        "n_scans=2000",
        "test_fraction=0.2",
        "matrix=512",
        "workers=8",
        "store_shape=128",
        "store_spacing_mm=1.5",
        "foundation_model=",
        "pretrain_config=pretrain_demo_large",
        "pretrain_stop_at_step=15",
        "label_fractions=0.01,0.1,0.3,1",
        "finetune_label_fractions=0.01,0.1,0.3",
        "seeds=5",
        "finetune_seeds=3",
        "finetune_findings=ich,sdh,fracture",
        "findings=ich,iph,ivh,sdh,edh,sah,infarct,hydrocephalus,atrophy,mass,midline_shift,fracture",
        "finetune_max_steps=20000",
        "finetune_eval_every=100",
        "finetune_batch_size=32",
        "stages_at_once=1",
    ],
}


def load_demo_config(path: str | None, scale: str, overrides: list[str]) -> DemoConfig:
    """The demo's config: the ``scale`` preset, then the YAML ``path``, then ``key=value`` overrides."""
    return load_config(DemoConfig, path, DEMO_SCALES[scale] + overrides)


Stage = list[str]  # one ``fmct`` command line
Chain = list[Stage]  # stages that run one after the other


def demo_stages(config: DemoConfig, out: Path) -> list[list[Chain]]:
    """The demo's verbs in order, each an ``fmct`` command line, as steps of chains: the chains of a step
    are independent of each other (each writes its own folders) and may run at the same time, the
    longest first."""
    cohort, store, run = out / "cohort", out / "store", out / "pretrain"
    labels = str(cohort / "labels.csv")
    workers = str(config.workers)
    split = ["--ood-sites", config.ood_sites, "--findings", config.findings]
    # Every arm takes the cohort's split column (the held-out site's scans are test-only whatever it says).
    split_config = ["use_split_column=true"]
    shares = (1 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
    embed = ["embed", "--store", str(store), "--workers", workers]
    probe = [
        "probe",
        "--labels",
        labels,
        "--store",
        str(store),
        *split,
        "--seeds",
        str(config.seeds),
        "--label-fractions",
        config.label_fractions,
    ]
    finetune = [
        "finetune",
        "--store",
        str(store),
        "--labels",
        labels,
        "--ood-sites",
        config.ood_sites,
        "--findings",
        config.finetune_findings,
        "--workers",
        workers,
        "--max-steps",
        str(config.finetune_max_steps),
        "--batch-size",
        str(config.finetune_batch_size),
        "--name",
        "vit",
        *split_config,
        f"eval_every={config.finetune_eval_every}",
        f"patience={config.finetune_patience}",
        f"min_steps={config.finetune_min_steps}",
        *config.finetune,
    ]
    # The pretrained arm: the shipped foundation checkpoint, or (when none is named) the demo's own run.
    foundation = config.foundation_model or str(run)
    pretrain = [
        "pretrain",
        "--store",
        str(store),
        "--out",
        str(run),
        "--config",
        config.pretrain_config,
        f"engine.seed={config.seed}",
        f"data.labels={labels}",
        f"data.exclude_sites=[{config.ood_sites}]",
        *config.pretrain,
    ]

    def embed_and_probe(model: list[str], suffix: str, name: str, arm: str) -> list[list[str]]:
        """Embed with ``model`` into ``embeddings<suffix>``, then probe into ``probe<suffix>`` as ``name`` (``arm``)."""
        embeddings = str(out / f"embeddings{suffix}")
        return [
            [*embed, *model, "--out", embeddings],
            [
                *probe,
                "--embeddings",
                embeddings,
                "--out",
                str(out / f"probe{suffix}"),
                "--model",
                name,
                "--arm",
                arm,
                *split_config,
            ],
        ]

    sequential = [
        [
            "synth",
            "--out",
            str(cohort),
            "--n",
            str(config.n_scans),
            "--sites",
            config.sites,
            "--format",
            "dicom",
            "--seed",
            str(config.seed),
            "--workers",
            workers,
            "--matrix",
            str(config.matrix),
            "--split",
            ",".join(f"{share:g}" for share in shares),
        ],
        [
            "ingest",
            str(cohort / "dicom"),
            "--out",
            str(store),
            "--workers",
            workers,
            f"canonical.shape=[{config.store_shape},{config.store_shape},{config.store_shape}]",
            f"canonical.spacing_mm={config.store_spacing_mm}",
        ],
        # The demo's own short pretraining shows the verb: stopped half-way, then resumed by the same
        # command. The held-out site stays unseen by pretraining too: its scans test generalisation only.
        [*pretrain, f"engine.stop_at_step={config.pretrain_stop_at_step}"],
        pretrain,
    ]
    probes = [
        embed_and_probe(["--model", foundation], "", "vit-linear-probe", "pretrained"),
        # The floors every pretrained arm must beat, embedded and probed like the pretrained backbone.
        embed_and_probe(
            ["--model", "scratch", "--like", foundation], "_random_init", "vit-linear-probe", "random-init"
        ),
        embed_and_probe(["--model", "hu-histogram"], "_hu_histogram", "hu-histogram", "hu-histogram"),
    ]
    # Each fit in its own process: a fit's length varies with its seed (168-264 steps in the demo), so
    # fits as separate chains share the two lanes more evenly than an arm's seeds one after the other.
    # The ceiling, the longest (every training label), first; it is measured against, with one seed.
    scratch = ["--model", "scratch", "--like", foundation]
    fits = [("finetune_ceiling", scratch, "ceiling", "1", 0)] + [
        (f"finetune_{arm}_seed{seed}", model, arm, config.finetune_label_fractions, seed)
        for seed in range(config.finetune_seeds)
        for arm, model in (("pretrained", ["--model", foundation]), ("scratch", scratch))
    ]
    finetunes = [
        [*finetune, *model, "--label-fractions", fractions, "--seeds", "1", "--first-seed", str(seed)]
        + ["--out", str(out / name), "--arm", arm]
        for name, model, arm, fractions, seed in fits
    ]
    evaluate = [
        "evaluate",
        "--predictions",
        str(out / "probe"),
        str(out / "probe_random_init"),
        str(out / "probe_hu_histogram"),
        *(str(out / name) for name, *_ in fits),
        "--out",
        str(out / "evaluation"),
    ]
    report = ["report", str(out / "evaluation"), "--out", str(out / "report.html"), "--pretraining", foundation]
    # The fits first, as the longest; the probes, each arm's embed and probe a chain of about 15 s, fill
    # whichever core the fits leave free at the end (as one chain of 40 s they kept one core busy alone).
    return [[[stage]] for stage in sequential] + [[*[[fit] for fit in finetunes], *probes], [[evaluate]], [[report]]]


def run_demo(config: DemoConfig, out: Path, run_verb: Callable[[list[str]], int]) -> int:
    """Run every stage with ``run_verb`` (the CLI's ``main``), a group of independent stages at once in
    processes of their own (:func:`run_at_once`), then print the summary; the exit status of the first
    stage that fails, else 0."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "demo.yaml")
    seconds_per_step: dict[str, float] = {}  # in the order the steps run; a step's verbs, its calls add up
    for chains in demo_stages(config, out):
        began = time.monotonic()
        step = " + ".join(dict.fromkeys(stage[0] for chain in chains for stage in chain))
        if len(chains) > 1 and config.stages_at_once > 1:
            status = run_at_once(chains, config.stages_at_once, out / "logs")
        else:
            status = 0
            for stage in (stage for chain in chains for stage in chain):
                print(f"\n== fmct {' '.join(stage)}", flush=True)
                if (status := run_verb(stage)) != 0:
                    break
        seconds_per_step[step] = seconds_per_step.get(step, 0.0) + time.monotonic() - began
        if status != 0:
            logger.error(f"fmct demo: stage {step} failed (exit {status}); fix it and re-run to resume")
            return status
    print(demo_summary(out / "evaluation", config))
    if config.foundation_model:
        print(
            f"\nThe pretrained arm is the shipped checkpoint {config.foundation_model} (pretrained on other synthetic "
            f"heads, never on site {config.ood_sites}); the demo's own pretraining in {out / 'pretrain'} only shows "
            f"the verb and its resume and is not evaluated."
        )
    minutes = (time.monotonic() - start) / 60
    print(
        f"\nThis invocation of the demo took {minutes:.1f} min (set-up and stages a re-run found done not included); "
        f"the goal for a fresh clone, set-up included, is 10 min on 2 CPU cores."
    )
    print("Time per step: " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in seconds_per_step.items()))
    print(f"\nreport: {(out / 'report.html').resolve()}")
    return 0


def run_at_once(chains: list[Chain], at_once: int, logs: Path, progress_every_s: float = 60.0) -> int:
    """Run independent chains of ``fmct`` stages, ``at_once`` chains at a time in the order given, each
    stage a ``python -m fmct.cli`` process on an even share of this process's CPU cores (at least one
    thread), its output in ``logs/<the stage's --out folder name>.log``; every ``progress_every_s``
    seconds, the last progress line of each stage still running. A chain stops at its first failure.
    Returns 0, or the exit status of the first chain (in the order given) that failed, after every chain
    has ended."""
    logs.mkdir(parents=True, exist_ok=True)
    lanes = max(1, min(at_once, len(chains)))
    threads = str(max(1, usable_cores() // lanes))
    # torch, OpenMP and the BLAS libraries read these when a process starts.
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running: dict[str, Path] = {}  # stage log name -> log, while the stage runs

    def run(stage: Stage) -> int:
        log = logs / f"{Path(stage[stage.index('--out') + 1]).name}.log"
        print(f"\n== fmct {' '.join(stage)}\n   ({threads} thread(s), output in {log})", flush=True)
        began = time.monotonic()
        with open(log, "w") as output:
            running[log.stem] = log
            status = subprocess.run(
                [sys.executable, "-m", "fmct.cli", *stage], stdout=output, stderr=subprocess.STDOUT, env=environment
            ).returncode
            del running[log.stem]
        ending = f"; {last_line(log)}" if status else ""
        outcome = "done" if status == 0 else f"FAILED (exit {status})"
        print(f"   {log.stem}: {outcome} in {time.monotonic() - began:.0f} s{ending}", flush=True)
        return status

    def run_chain(chain: Chain) -> int:
        return next((status for status in map(run, chain) if status != 0), 0)

    with ThreadPoolExecutor(max_workers=lanes) as pool:
        futures = [pool.submit(run_chain, chain) for chain in chains]
        while wait(futures, timeout=progress_every_s).not_done:
            for name, log in list(running.items()):
                print(f"   {name}: {last_line(log)}", flush=True)
    return next((future.result() for future in futures if future.result() != 0), 0)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def last_line(log: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of ``log`` as a terminal would show it: a progress bar's carriage-return
    updates and cursor moves are resolved to the latest one."""
    with open(log, "rb") as file:
        file.seek(max(0, file.seek(0, os.SEEK_END) - tail_bytes))
        text = file.read().decode(errors="replace")
    lines = [line.strip() for line in _CURSOR_MOVES.sub("", text).replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line), "")


_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's moves between its nested bars


def demo_summary(evaluation_dir: Path, config: DemoConfig) -> str:
    """For the first finding: AUROC [95% CI] of each arm per label fraction, in- and out-of-distribution;
    the paired pretrained - scratch differences of the fine-tuned twins; the gap to the supervised
    ceiling; the paired differences of the pretrained linear probe from each floor; the claim."""
    from fmct.eval.evaluate import FLOORS, arm_effects, pretraining_effects, read_evaluation

    evaluation = read_evaluation(evaluation_dir)
    finding = config.findings.split(",")[0]
    rows = [row for row in evaluation.metrics if row["finding"] == finding and row["label_fraction"]]
    fractions = sorted({row["label_fraction"] for row in rows}, key=float)
    cells = {(row["model"], row["arm"], row["group"], row["label_fraction"]): row for row in rows}
    lines = [
        f"\n{finding}: AUROC [95% CI] by share of training labels",
        f"{'model (arm)':34} {'group':5} " + " ".join(f"{f:>20}" for f in fractions),
    ]
    for model, arm in sorted(
        {(row["model"], row["arm"]) for row in rows}, key=lambda system: (system[1] in FLOORS, system)
    ):
        for group in ("ID", "OOD"):
            row_cells = []
            for fraction in fractions:
                row = cells.get((model, arm, group, fraction))
                if row is None:
                    row_cells.append("-")
                elif row["auroc"] is None:  # fewer than 5 positives or 5 negatives
                    row_cells.append("not estimable")
                else:
                    row_cells.append(f"{row['auroc']:.3f} [{row['auroc_lo']:.2f},{row['auroc_hi']:.2f}]")
            lines.append(f"{model + ' (' + arm + ')':34} {group:5} " + " ".join(f"{c:>20}" for c in row_cells))

    def of(effects: list[dict], model: str) -> list[dict]:
        """The effects of ``model`` on the summary's finding, by group then label fraction."""
        return sorted(
            (e for e in effects if e["finding"] == finding and e["model"] == model),
            key=lambda e: (e["group"], float(e["label_fraction"] or 0)),
        )

    def difference(e: dict) -> str:
        return (
            f"  {e['group']:4} labels {e['label_fraction']:>5}: {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]  "
            f"p={e['p_bootstrap']:.3f} (Holm {e['p_holm']:.3f})"
        )

    lines.append(f"\n{finding}: pretrained - scratch (fine-tuned), AUROC difference [95% CI], paired bootstrap p")
    effects = of(pretraining_effects(evaluation.comparisons), "vit")
    lines += [difference(e) for e in effects]
    better = [f"{e['group']} at {e['label_fraction']}" for e in effects if e["low"] > 0]
    lines.append(
        f"  pretraining is significantly better at: {', '.join(better)}"
        if better
        else "  at no budget is the pretrained model significantly better than scratch on this run"
    )
    lines += _ceiling_lines(finding, cells, fractions)
    # The claim, checked at the smallest label fraction: fine-tuned beats scratch, probe beats each floor.
    low_budget = min((e["label_fraction"] for e in effects), key=float, default=fractions[0] if fractions else None)
    checks = [("fine-tuned from the pretrained model beats scratch", effects)]
    for floor in FLOORS:
        lines.append(
            f"\n{finding}: pretrained linear probe - {floor} floor, AUROC difference [95% CI], paired bootstrap p"
        )
        floor_effects = of(arm_effects(evaluation.comparisons, floor), "vit-linear-probe")
        lines += [difference(e) for e in floor_effects]
        cleared = [
            f"{e['group']} {e['label_fraction']} [{e['low']:+.3f}, {e['high']:+.3f}]"
            for e in floor_effects
            if e["low"] > 0
        ]
        lines.append(
            f"  pretrained linear probe vs {floor}: "
            + (
                f"clears it (95% CI above 0) at {', '.join(cleared)}"
                if cleared
                else "clears it at no budget on this run"
            )
        )
        checks.append((f"the pretrained linear probe beats the {floor} floor", floor_effects))
    lines += claim_lines(finding, low_budget, checks, evaluation.metrics)
    return "\n".join(lines)


def _ceiling_lines(finding: str, cells: dict, fractions: list[str]) -> list[str]:
    """The supervised ceiling (scratch on all training labels) beside the fine-tuned twins at each budget."""
    ceiling = {
        group: cells.get(("vit", "ceiling", group, fraction))
        for group in ("ID", "OOD")
        for fraction in fractions
        if cells.get(("vit", "ceiling", group, fraction))
    }
    if not ceiling:
        return [f"\n{finding}: no supervised ceiling in this evaluation"]
    lines = [
        f"\n{finding}: the supervised ceiling (scratch, all training labels, early-stopped) and the twins below it"
    ]
    for group, row in ceiling.items():
        twins = [
            f"{arm} at {fraction}: {cells[('vit', arm, group, fraction)]['auroc']:.3f}"
            for arm in ("pretrained", "scratch")
            for fraction in fractions
            if cells.get(("vit", arm, group, fraction)) and cells[("vit", arm, group, fraction)]["auroc"] is not None
        ]
        figure = (
            "not estimable"
            if row["auroc"] is None
            else f"{row['auroc']:.3f} [{row['auroc_lo']:.2f},{row['auroc_hi']:.2f}]"
        )
        lines.append(f"  {group:4} ceiling {figure}; " + "; ".join(twins))
    return lines


def claim_lines(
    finding: str, fraction: str | None, checks: list[tuple[str, list[dict]]], metrics: list[dict]
) -> list[str]:
    """The demo's claim at label fraction ``fraction``, ID and OOD, each part met (paired 95% CI above 0) or
    not, with its figure; and the test splits it was judged on (scans, positives)."""
    sizes = {row["group"]: row for row in metrics if row["finding"] == finding}
    lines = [
        f"\nThe claim at {fraction} of the training labels ({finding}; test splits: "
        + ", ".join(
            f"{g} {sizes[g]['n_scans']} scans, {sizes[g]['n_pos']} positive" for g in ("ID", "OOD") if g in sizes
        )
        + "):"
    ]
    met_parts: list[str] = []
    n_parts = 0
    for what, effects in checks:
        for group in ("ID", "OOD"):
            effect = next((e for e in effects if e["group"] == group and e["label_fraction"] == fraction), None)
            met = effect is not None and effect["low"] > 0
            n_parts += 1
            if met:
                met_parts.append(group)
            figure = (
                f"{effect['diff']:+.3f} [{effect['low']:+.3f}, {effect['high']:+.3f}]" if effect else "not evaluated"
            )
            lines.append(f"  {'MET    ' if met else 'NOT MET'} {group:4} {what}: {figure}")
    if len(met_parts) == n_parts:
        lines.append("  the claim holds on this run")
    elif met_parts:
        counts = ", ".join(f"{met_parts.count(group)} {group}" for group in ("ID", "OOD") if group in met_parts)
        lines.append(
            f"  the claim does NOT hold in full on this run: {len(met_parts)} of {n_parts} parts met ({counts}), "
            "see the figures above"
        )
    else:
        lines.append("  the claim does NOT hold on this run: pretraining does not pay here (see the figures above)")
    return lines
