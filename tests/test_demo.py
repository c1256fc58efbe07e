"""`fmct demo` end to end on a reduced cohort: every verb runs, the report has every section; and the demo's
closing summary on evaluated predictions of every arm."""

import pytest

from fmct.cli import main
from fmct.demo import DemoConfig, claim_lines, demo_stages, demo_summary, last_line, run_at_once
from fmct.eval.evaluate import evaluate, write_evaluation, write_predictions
from test_report import signal_predictions

ARMS = (
    "vit (pretrained)",
    "vit (scratch)",
    "vit-linear-probe (pretrained)",
    "vit-linear-probe (random-init)",
    "hu-histogram (hu-histogram)",
)


def test_demo_summary_shows_the_floors_and_a_verdict_per_floor(tmp_path):
    systems = {
        ("vit", "pretrained"): 1.0,
        ("vit", "scratch"): 1.0,
        ("vit-linear-probe", "pretrained"): 2.5,
        ("vit-linear-probe", "random-init"): 0.0,
        ("hu-histogram", "hu-histogram"): 4.0,
    }
    rows = signal_predictions(systems, n=160, fractions=("0.5", "1.0"), splits=("test", "ood"))
    write_predictions(tmp_path / "pred", rows, {})
    write_evaluation(evaluate([tmp_path / "pred"], n_bootstrap=200), tmp_path / "evaluation")
    printed = demo_summary(tmp_path / "evaluation", DemoConfig(findings="ich"))
    for arm in ARMS:
        assert f"\n{arm:34} ID " in printed and f"\n{arm:34} OOD " in printed
    assert "ich: pretrained linear probe - random-init floor, AUROC difference [95% CI]" in printed
    assert "pretrained linear probe vs random-init: clears it (95% CI above 0) at ID 0.5 [+" in printed
    assert "OOD 1.0 [+" in printed.split("pretrained linear probe vs random-init:")[1].splitlines()[0]
    assert "pretrained linear probe vs hu-histogram: clears it at no budget on this run" in printed


def test_each_fit_runs_in_its_own_process_and_evaluate_reads_them_all(tmp_path):
    steps = demo_stages(DemoConfig(finetune_seeds=3), tmp_path)
    fit_stages = [chain[0] for chain in steps[4] if chain[0][0] == "finetune"]
    assert [len(chain) for chain in steps[4]] == [1] * len(fit_stages) + [2] * 3  # each arm's embed, probe last

    def option(stage: list[str], flag: str) -> str:
        return stage[stage.index(flag) + 1]

    assert all(option(stage, "--seeds") == "1" for stage in fit_stages)
    arms_seeds = sorted((option(stage, "--arm"), option(stage, "--first-seed")) for stage in fit_stages)
    assert arms_seeds == [("ceiling", "0")] + [(arm, str(k)) for arm in ("pretrained", "scratch") for k in range(3)]
    assert option(fit_stages[0], "--arm") == "ceiling" and option(fit_stages[0], "--label-fractions") == "1"
    (evaluate,) = steps[5][0]
    assert {option(stage, "--out") for stage in fit_stages} <= set(evaluate)


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        "n_scans=36",
        "matrix=128",
        "seeds=1",
        "label_fractions=0.5,1",
        "finetune_label_fractions=0.5",
        "finetune_max_steps=6",
        "finetune_eval_every=3",
        "finetune_patience=1",
        "finetune_batch_size=4",
        "findings=ich,hydrocephalus",
        "pretrain=[optim.epoch_length=5, optim.epochs=2, optim.batch_size=4, engine.checkpoint_every=5]",
        "pretrain_stop_at_step=4",
    ]
    assert main(["demo", "--out", str(out), *overrides]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "ich: AUROC [95% CI] by share of training labels" in printed and "report:" in printed
    html = (out / "report.html").read_text()
    # The demo's own pretraining stops at step 4, then the same command resumes it to the end (10 steps).
    assert "resuming" in captured.err and (out / "pretrain" / "backbone").is_dir()
    assert "The pretrained arm is the shipped checkpoint fmct-synth-tiny" in printed
    timeline = printed[printed.index("Time per step: ") :].splitlines()[0]
    steps = [part.rsplit(" ", 2)[0] for part in timeline.removeprefix("Time per step: ").split(", ")]
    assert steps == ["synth", "ingest", "pretrain", "finetune + embed + probe", "evaluate", "report"]
    # The fine-tunes and the probes ran at once, each stage in a process of its own with its own log.
    logs = {path.stem for path in (out / "logs").glob("*.log")}
    fits = {"finetune_ceiling"} | {f"finetune_{arm}_seed{seed}" for arm in ("pretrained", "scratch") for seed in (0, 1)}
    assert logs == fits | {"embeddings", "probe"} | {
        f"{stage}_{floor}" for stage in ("embeddings", "probe") for floor in ("random_init", "hu_histogram")
    }
    assert "<img" in html[html.index("<h2 id='learning-curves'>") : html.index("<h2 id='methods'>")]
    for section in (
        "summary",
        "learning-curves",
        "roc",
        "label-efficiency",
        "id-vs-ood",
        "comparisons",
        "metrics",
        "provenance",
    ):
        assert f"<h2 id='{section}'>" in html
    for arm in (*ARMS, "vit (ceiling)"):
        assert arm in printed
    assert "the supervised ceiling (scratch, all training labels, early-stopped)" in printed
    for floor in ("random-init", "hu-histogram"):
        assert f"pretrained linear probe vs {floor}: " in printed
        assert f"the {floor} floor" in html[html.index("<h2 id='summary'>") : html.index("<h2 id='roc'>")]
    # Re-running resumes: every stage finds its work done.
    assert main(["demo", "--out", str(out), *overrides]) == 0


def test_the_claim_says_how_many_of_its_parts_a_run_met():
    def effect(group: str, low: float) -> dict:
        return {"group": group, "label_fraction": "0.1", "diff": low + 0.1, "low": low, "high": low + 0.2}

    metrics = [{"finding": "ich", "group": "ID", "n_scans": 108, "n_pos": 38}]
    beats_scratch = ("fine-tuned beats scratch", [effect("ID", 0.07), effect("OOD", -0.001)])
    beats_floor = ("the probe beats the floor", [effect("ID", 0.004), effect("OOD", -0.09)])
    lines = claim_lines("ich", "0.1", [beats_scratch, beats_floor], metrics)
    assert lines[0] == "\nThe claim at 0.1 of the training labels (ich; test splits: ID 108 scans, 38 positive):"
    assert lines[1] == "  MET     ID   fine-tuned beats scratch: +0.170 [+0.070, +0.270]"
    assert lines[2] == "  NOT MET OOD  fine-tuned beats scratch: +0.099 [-0.001, +0.199]"
    assert lines[-1] == "  the claim does NOT hold in full on this run: 2 of 4 parts met (2 ID), see the figures above"
    nothing = claim_lines("ich", "0.1", [("fine-tuned beats scratch", [effect("ID", -0.1)])], metrics)
    assert "NOT MET OOD  fine-tuned beats scratch: not evaluated" in nothing[2] and "does not pay" in nothing[-1]
    everything = claim_lines("ich", "0.1", [("fine-tuned beats scratch", [effect("ID", 0.1), effect("OOD", 0.1)])], [])
    assert everything[-1] == "  the claim holds on this run"


def test_stages_run_at_once_report_the_first_failure_and_keep_each_output(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    made = ["synth", "--out", str(cohort), "--n", "1", "--sites", "A", "--format", "nifti", "--matrix", "16"]
    broken = ["evaluate", "--predictions", str(tmp_path / "missing"), "--out", str(tmp_path / "evaluation")]
    status = run_at_once([[broken], [made]], at_once=2, logs=tmp_path / "logs")
    # The failure's exit status comes back after the other stage has finished its work.
    assert status != 0 and (cohort / "labels.csv").is_file()
    assert "synth: 1 cases written" in (tmp_path / "logs" / "cohort.log").read_text()
    assert "missing" in (tmp_path / "logs" / "evaluation.log").read_text()
    printed = capsys.readouterr().out
    assert "evaluation: FAILED" in printed and "cohort: done" in printed
    assert run_at_once([[made]], at_once=2, logs=tmp_path / "logs") == 0  # resumed: the case is found done


def test_the_progress_shown_of_a_running_stage_is_its_latest_bar(tmp_path):
    log = tmp_path / "finetune_pretrained.log"
    # tqdm in a file: a nested bar redrawn with carriage returns and a cursor move up after each redraw.
    log.write_text("finetune: fits\n  steps:  5%| 100/2000\x1b[A\r  steps: 12%| 240/2000, best=0.756@156\x1b[A\r\n\n")
    assert last_line(log) == "steps: 12%| 240/2000, best=0.756@156"
    log.write_text("x" * 10_000 + "\nfmct finetune: no labelled scan is in the store\n")
    assert last_line(log, tail_bytes=100) == "fmct finetune: no labelled scan is in the store"
