"""The supervised ceiling (arm ``ceiling``: scratch on all the labels) in evaluate and report, and the fits
that the step cap ended."""

import json
import math
import zlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmct.cli import main
from fmct.eval import metrics as M
from fmct.eval.evaluate import (
    CEILING,
    FIT_COLUMNS,
    ceiling_effects,
    evaluate,
    holm_family,
    read_evaluation,
    with_holm,
    write_evaluation,
    write_predictions,
)
from fmct.eval.report import render_html
from fmct.eval.report_figures import CEILING_LABEL, label_efficiency_figure

N = 300  # scans per site group
LABELS = np.random.default_rng(0).integers(0, 2, 2 * N)  # scans 0..N-1: test (site A); N..2N-1: ood (site C)
# score = signal x label + N(0, 1): AUROC = Phi(signal / sqrt 2), 0.7 at 0.74 and 0.9 at 1.81.
SIGNAL_07, SIGNAL_09 = 0.74, 1.81


def _scores(model: str, arm: str, fraction: str, seed: int, signal: float) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{model}/{arm}/{fraction}/{seed}".encode()))
    return signal * LABELS + rng.normal(size=2 * N)


def _write(
    folder, model: str, arm: str, signals: dict[str, float], seeds=(0,), ended_by: str | None = "early_stopping"
):
    """A finetune-like predictions folder of ich on the shared scans: per label fraction its signal, per seed a
    fit; run.json's fits record how each ended (no ``ended_by`` key when ``ended_by`` is None, as in old folders)."""
    rows, fits = [], []
    for fraction, signal in signals.items():
        for seed in seeds:
            scores = _scores(model, arm, fraction, seed, signal)
            rows += [
                {
                    "scan_id": f"s{i}",
                    "patient_id": f"p{i}",
                    "site": "A" if i < N else "C",
                    "split": "test" if i < N else "ood",
                    "finding": "ich",
                    "label": int(LABELS[i]),
                    "score": scores[i],
                    "model": model,
                    "arm": arm,
                    "label_fraction": fraction,
                    "seed": seed,
                    "shots": "",
                }
                for i in range(2 * N)
            ]
            fit = {
                "seed": seed,
                "label_fraction": float(fraction),
                "shots": None,
                "steps": 500,
                "best_step": 400,
                "per_finding": {
                    "ich": {"n_train_pos": round(400 * float(fraction)), "n_train_neg": round(600 * float(fraction))}
                },
            }
            if ended_by is not None:
                fit["ended_by"] = ended_by
            fits.append(fit)
    write_predictions(folder, rows, {"command": "finetune", "model": model, "arm": arm, "fits": fits})


def _section(page: str, section: str) -> str:
    start = page.index(f"<h2 id='{section}'>")
    end = page.find("<h2 id=", start + 1)
    return page[start:] if end < 0 else page[start:end]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """pretrained (two seeds) and scratch at 0.1 and 1.0, the ceiling at 1.0 (one seed), the random-init floor."""
    root = tmp_path_factory.mktemp("ceiling")
    _write(root / "pretrained", "vit", "pretrained", {"0.1": SIGNAL_07, "1.0": 1.3}, seeds=(0, 1))
    _write(root / "scratch", "vit", "scratch", {"0.1": 0.2, "1.0": 1.0}, seeds=(0, 1))
    _write(root / "ceiling", "vit-scratch", CEILING, {"1.0": SIGNAL_09})
    _write(root / "floor", "vit", "random-init", {"0.1": 0.1, "1.0": 0.3})
    return root


@pytest.fixture(scope="module")
def evaluation(folders):
    return evaluate([folders / name for name in ("pretrained", "scratch", "ceiling", "floor")], n_bootstrap=300)


def test_pretrained_at_fewer_labels_against_the_ceiling_on_the_same_scans(evaluation):
    effects = ceiling_effects(evaluation.comparisons)
    assert sorted((e["model"], e["baseline_model"], e["group"], e["budget"]) for e in effects) == [
        ("vit", "vit-scratch", group, budget) for group in ("ID", "OOD") for budget in ("0.1", "1.0")
    ]
    ceiling_scores = _scores("vit-scratch", CEILING, "1.0", 0, SIGNAL_09)
    for group, scans in (("ID", slice(0, N)), ("OOD", slice(N, 2 * N))):
        at_01 = next(e for e in effects if (e["group"], e["budget"]) == (group, "0.1"))
        # Seeds pair through the shared resampled patients: the pretrained AUROC is its mean over its two seeds.
        pretrained = np.mean(
            [roc_auc_score(LABELS[scans], _scores("vit", "pretrained", "0.1", s, SIGNAL_07)[scans]) for s in (0, 1)]
        )
        ceiling = roc_auc_score(LABELS[scans], ceiling_scores[scans])
        assert 0.65 < pretrained < 0.75 and 0.87 < ceiling < 0.93
        assert at_01["diff"] == pytest.approx(pretrained - ceiling, abs=1e-12)
        assert at_01["low"] < at_01["diff"] < at_01["high"] < 0  # below the ceiling, the CI excludes 0
        assert at_01["high"] - at_01["low"] < 0.15 and math.isnan(at_01["p_holm"])  # descriptive: not in Holm's family
        row = next(
            c for c in evaluation.comparisons if c["arm_b"] == CEILING and (c["group"], c["budget"]) == (group, "0.1")
        )
        assert (row["model_a"], row["arm_a"], row["label_fraction"], row["n_scans"], row["primary"]) == (
            "vit",
            "pretrained",
            "0.1",
            N,
            False,
        )

    # The ceiling is only ever compared as the ceiling: not with scratch or the floor at label fraction 1.
    assert all(c["arm_a"] == "pretrained" for c in evaluation.comparisons if CEILING in (c["arm_a"], c["arm_b"]))
    # Holm's family is the primary comparisons alone, the ceiling's left out even when nothing else is there.
    primary = [c for c in evaluation.comparisons if c["primary"]]
    assert len(primary) == 8 and [c["p_holm"] for c in primary] == pytest.approx(
        M.holm([c["p_bootstrap"] for c in primary]).tolist()
    )
    alone = [c for c in evaluation.comparisons if c["arm_b"] == CEILING]
    assert not any(holm_family(alone)) and all(math.isnan(c["p_holm"]) for c in with_holm(alone))
    # Tables: pretrained, scratch, the ceiling, then the floors.
    assert list(dict.fromkeys(m["arm"] for m in evaluation.metrics)) == [
        "pretrained",
        "scratch",
        CEILING,
        "random-init",
    ]


def test_report_names_the_ceiling_and_the_gap_to_it(evaluation):
    summary = _section(render_html(evaluation, {}), "summary")
    ceiling = {m["group"]: m for m in evaluation.metrics if m["arm"] == CEILING}
    gap = {e["group"]: e for e in ceiling_effects(evaluation.comparisons) if e["budget"] == "0.1"}
    assert (
        "<b>Supervised ceiling, ich</b> (the same architecture from a random init, fine-tuned on all the training "
        "labels until early stopping; label fraction 1.0, 1000 labelled scans): AUROC [95% CI] "
        f"vit-scratch (ceiling) ID {ceiling['ID']['auroc']:.3f} "
        f"[{ceiling['ID']['auroc_lo']:.3f}, {ceiling['ID']['auroc_hi']:.3f}]; "
        f"vit-scratch (ceiling) OOD {ceiling['OOD']['auroc']:.3f}"
    ) in summary
    assert "The pretrained arms' gap to it at label fraction 0.1" in summary
    assert (
        f"vit ID {gap['ID']['diff']:+.3f} [{gap['ID']['low']:+.3f}, {gap['ID']['high']:+.3f}]; "
        f"vit OOD {gap['OOD']['diff']:+.3f}"
    ) in summary
    assert "Below the ceiling (CI under 0) at 2 of 2." in summary
    assert "<td>vit vs vit-scratch (ceiling)</td><td>ich</td><td>ID</td><td class='num'><span class='down'>" in summary
    assert "cut by max_steps" not in summary and "Not a valid ceiling" not in summary
    comparisons = _section(render_html(evaluation, {}), "comparisons")
    assert "<b>Against the supervised ceiling</b>" in comparisons and "adjusted over the 8 comparisons" in comparisons


def test_report_without_a_ceiling_says_so(evaluation):
    without = type(evaluation)(
        **{
            **vars(evaluation),
            "metrics": [m for m in evaluation.metrics if m["arm"] != CEILING],
            "comparisons": [c for c in evaluation.comparisons if c["arm_b"] != CEILING],
        }
    )
    summary = _section(render_html(without, {}), "summary")
    assert "<b>No supervised ceiling in this evaluation</b>" in summary and "Supervised ceiling, ich" not in summary


def test_fits_cut_by_max_steps_are_warned_of_and_a_cut_ceiling_is_not_valid(folders, tmp_path):
    _write(tmp_path / "pretrained", "vit", "pretrained", {"0.1": SIGNAL_07, "1.0": 1.3}, ended_by="max_steps")
    _write(tmp_path / "ceiling", "vit-scratch", CEILING, {"1.0": SIGNAL_09}, ended_by="max_steps")
    evaluation = evaluate([tmp_path / "pretrained", tmp_path / "ceiling", folders / "scratch"], n_bootstrap=50)
    cut = [
        (f["model"], f["arm"], f["label_fraction"], f["seed"], f["steps"])
        for f in evaluation.fits
        if f["ended_by"] == "max_steps"
    ]
    assert cut == [
        ("vit", "pretrained", "0.1", "0", 500),
        ("vit", "pretrained", "1.0", "0", 500),
        ("vit-scratch", CEILING, "1.0", "0", 500),
    ]
    assert {f["ended_by"] for f in evaluation.fits if f["arm"] == "scratch"} == {"early_stopping"}

    write_evaluation(evaluation, tmp_path / "eval")
    assert (tmp_path / "eval" / "fits.csv").read_text().splitlines()[0] == ",".join(FIT_COLUMNS)
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "eval"), "--out", str(out)]) == 0  # the fits travel through metrics.json
    summary = _section(out.read_text(), "summary")
    assert "<b>3 fine-tuned fit(s) ended at the step cap, not by early stopping</b>" in summary
    assert (
        "<li>vit (pretrained), label fraction 0.1, seed 0 was cut by max_steps at 500 steps: "
        "not a converged baseline</li>" in summary
    )
    assert (
        "<p class='note'><b>Not a valid ceiling</b>: vit-scratch (ceiling), label fraction 1.0, seed 0 ended at the "
        "step cap"
    ) in summary


def test_old_run_json_without_ended_by_still_evaluates(tmp_path):
    _write(tmp_path / "pretrained", "vit", "pretrained", {"0.1": SIGNAL_07}, ended_by=None)
    _write(tmp_path / "ceiling", "vit-scratch", CEILING, {"1.0": SIGNAL_09}, ended_by=None)
    evaluation = evaluate([tmp_path / "pretrained", tmp_path / "ceiling"], n_bootstrap=50)
    assert {f["ended_by"] for f in evaluation.fits} == {"unknown"} and len(evaluation.fits) == 2
    assert len(ceiling_effects(evaluation.comparisons)) == 2
    assert "cut by max_steps" not in render_html(evaluation, {})

    # An evaluation folder written before fits were recorded: they are told from its runs.
    write_evaluation(evaluation, tmp_path / "eval")
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    del document["fits"]
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(document))
    assert [f["ended_by"] for f in read_evaluation(tmp_path / "eval").fits] == ["unknown", "unknown"]


def test_label_efficiency_draws_the_ceiling_as_a_dashed_line_per_group(evaluation):
    rows = [m for m in evaluation.metrics if m["finding"] == "ich"]
    figure = label_efficiency_figure("ich", rows)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == 3 * 2  # pretrained, scratch, random-init per group: the ceiling is no panel
    for ax in panels:
        group = ax.get_title().rsplit(", ", 1)[1]
        (line,) = [line for line in ax.get_lines() if line.get_label() == CEILING_LABEL]
        ceiling = next(m for m in rows if (m["arm"], m["group"]) == (CEILING, group))
        assert line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(ceiling["auroc"])
        assert any(text.get_text().startswith(CEILING_LABEL) for text in ax.texts)
