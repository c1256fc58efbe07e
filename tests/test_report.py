"""evaluate + report on real peer predictions (CT-FM head CT triage: SinoCT in-distribution, CQ500 OOD)."""

import base64
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmct.cli import main
from fmct.eval import metrics as M
from fmct.eval.evaluate import evaluate, read_evaluation, write_evaluation, write_predictions
from fmct.eval.report import SECTIONS, render_html

PEER = Path(__file__).parent / "data" / "ctfm-predictions"
SETS = (("SinoCT", "patient_id", "test", "sinoct"), ("CQ500", "name", "ood", "cq500"))


def _peer_rows():
    """CT-FM's scores as fmct predictions: one finding (abnormal), three encoders x four label fractions."""
    rows = []
    for name, id_column, split, site in SETS:
        with open(PEER / f"{name}_combined_predictions.csv", newline="") as handle:
            for record in csv.DictReader(handle):
                for column, value in record.items():
                    if column in (id_column, "label"):
                        continue
                    model, percent = column.rsplit("_", 1)
                    rows.append({
                        "scan_id": f"{site}/{record[id_column]}", "patient_id": "", "site": site, "split": split,
                        "finding": "abnormal", "label": record["label"], "score": float(value), "model": model,
                        "arm": "scratch" if model == "baseline" else "pretrained",
                        "label_fraction": int(percent.removesuffix("pct")) / 100, "seed": 0, "probability": float(value),
                    })
    return rows


def _peer_column(name, id_column, column):
    with open(PEER / f"{name}_combined_predictions.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    return np.array([float(r["label"]) for r in records]), np.array([float(r[column]) for r in records])


def test_evaluate_and_report_on_real_peer_predictions(tmp_path):
    write_predictions(tmp_path / "pred", _peer_rows(), {"source": "CT-FM combined predictions", "commit": "f58c89a"})
    evaluation = evaluate([tmp_path / "pred"], n_bootstrap=200, seed=0)
    assert len(evaluation.metrics) == 3 * 4 * 2  # models x fractions x (ID, OOD)

    for (name, id_column, _, _), group in zip(SETS, ("ID", "OOD")):
        labels, scores = _peer_column(name, id_column, "ct_fm_10pct")
        row = next(m for m in evaluation.metrics if (m["model"], m["label_fraction"], m["group"]) == ("ct_fm", "0.1", group))
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)  # ties included
        assert row["auroc_lo"] < row["auroc"] < row["auroc_hi"] and row["auroc_hi"] - row["auroc_lo"] < 0.12
        assert row["n_scans"] == len(labels) and row["n_pos"] == int(labels.sum())

    # Paired comparison at 100% labels, in-distribution: CT-FM vs scratch, on the same 978 scans.
    comparison = next(
        c for c in evaluation.comparisons
        if (c["group"], c["label_fraction"], c["model_a"], c["model_b"]) == ("ID", "1.0", "ct_fm", "baseline")
    )
    labels, ct_fm = _peer_column("SinoCT", "patient_id", "ct_fm_100pct")
    _, baseline = _peer_column("SinoCT", "patient_id", "baseline_100pct")
    assert comparison["n_scans"] == 978
    assert comparison["auroc_diff"] == pytest.approx(roc_auc_score(labels, ct_fm) - roc_auc_score(labels, baseline), abs=1e-12)
    assert comparison["auroc_diff_lo"] < comparison["auroc_diff"] < comparison["auroc_diff_hi"]
    # One method for CI and p-value: every comparison's CI excludes 0 exactly when its p is below 0.05.
    for c in evaluation.comparisons:
        assert (c["p_bootstrap"] < 0.05) == (c["auroc_diff_lo"] > 0 or c["auroc_diff_hi"] < 0)
        assert c["p_bootstrap"] <= c["p_holm"] <= 1
    # CT-FM's scores are probabilities: the calibration uses them as such.
    row = next(m for m in evaluation.metrics if (m["model"], m["label_fraction"], m["group"]) == ("ct_fm", "1.0", "ID"))
    assert row["probability_source"] == "probability column"
    assert row["ece"] == pytest.approx(float(M.expected_calibration_error(labels, ct_fm)), abs=1e-12)
    assert row["ece_lo"] < row["ece"] < row["ece_hi"]

    write_evaluation(evaluation, tmp_path / "eval")
    again = read_evaluation(tmp_path / "eval")
    assert again.metrics[0]["auroc"] == evaluation.metrics[0]["auroc"]

    assert main(["report", str(tmp_path / "eval"), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2 id='{section}'>" in page and f"<a href='#{section}'>" in page  # and in the table of contents
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)  # ROC, label efficiency, calibration
    assert "f58c89a" in page and "cq500" in page and "sinoct" in page
    assert sorted(p.name for p in (tmp_path / "report_figures").iterdir()) == [
        "calibration_abnormal.png", "label_efficiency_abnormal.png", "roc_abnormal.png"]
    # No run.json records the cohort: it is told from the predictions, scanners not recorded.
    cohort = page[page.index("<h2 id='cohort'>"):page.index("<h2 id='metrics'>")]
    assert "predictions.csv (evaluated splits only)" in cohort and "not recorded" in cohort
    assert "<td>test (ID)</td><td>sinoct</td><td class=num>978</td>" in cohort
    # Nor the training-set sizes: label efficiency stands on the label fraction.
    assert all(math.isnan(m["n_train"]) for m in evaluation.metrics)


def test_evaluate_cli_with_seeds_shots_and_a_missing_column(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    labels = rng.integers(0, 2, 80)
    for arm, signal in (("pretrained", 2.0), ("scratch", 0.5)):
        for seed in range(3):
            scores = signal * labels + rng.normal(size=80)
            for i in range(80):
                rows.append({
                    "scan_id": f"s{i}", "patient_id": f"p{i // 2}", "site": "A", "split": "test", "finding": "ich",
                    "label": labels[i], "score": scores[i], "model": "vit", "arm": arm, "label_fraction": "", "seed": seed, "shots": 8,
                })
    write_predictions(tmp_path / "pred", rows, {"method": "logistic"})
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "eval"), "--bootstrap", "100"]) == 0
    evaluation = read_evaluation(tmp_path / "eval")
    pretrained = next(m for m in evaluation.metrics if m["arm"] == "pretrained")
    assert pretrained["budget"] == "8 shots" and pretrained["n_seeds"] == 3 and pretrained["n_patients"] == 40
    per_seed = [roc_auc_score(labels, [r["score"] for r in rows if r["arm"] == "pretrained" and r["seed"] == s]) for s in range(3)]
    assert pretrained["auroc"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert pretrained["auroc_seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    (comparison,) = evaluation.comparisons
    assert (comparison["arm_a"], comparison["arm_b"]) == ("pretrained", "scratch") and comparison["auroc_diff_lo"] > 0

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "predictions.csv").write_text("scan_id,label,score\na,1,0.5\n")
    assert main(["evaluate", "--predictions", str(tmp_path / "bad"), "--out", str(tmp_path / "e2")]) == 2
    assert "missing column(s) patient_id" in capsys.readouterr().err


def test_report_skips_a_finding_without_positives_in_a_group(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for fraction in ("0.1", "1.0"):
        for i in range(60):
            split = "test" if i < 30 else "ood"
            label = 0 if split == "test" else int(i % 3 == 0)  # no positive in-distribution
            rows.append({
                "scan_id": f"s{i}", "patient_id": f"p{i}", "site": "A" if split == "test" else "C", "split": split,
                "finding": "mass", "label": label, "score": label + rng.normal(), "model": "vit", "arm": "pretrained",
                "label_fraction": fraction, "seed": 0, "shots": "",
            })
    write_predictions(tmp_path / "pred", rows, {"method": "logistic"})
    assert main(["report", str(tmp_path / "pred"), "--out", str(tmp_path / "report.html"), "--bootstrap", "50"]) == 0
    assert (tmp_path / "report_figures" / "label_efficiency_mass.png").exists()  # drawn for OOD alone


def signal_predictions(systems: dict[tuple[str, str], float], n: int = 120, fractions=("0.1",), splits=("test",),
                       seed: int = 2) -> list[dict]:
    """Predictions of ich by each (model, arm) system on the same ``n`` scans, one seed, at each label fraction:
    score = signal x label + N(0, 1) noise. Scan i has split ``splits[i % len(splits)]`` (site C for ood, else A)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    split = [splits[i % len(splits)] for i in range(n)]
    rows = []
    for (model, arm), signal in systems.items():
        for fraction in fractions:
            scores = signal * labels + rng.normal(size=n)
            rows += [{
                "scan_id": f"s{i}", "patient_id": f"p{i}", "site": "C" if split[i] == "ood" else "A", "split": split[i],
                "finding": "ich", "label": labels[i], "score": scores[i], "model": model, "arm": arm,
                "label_fraction": fraction, "seed": 0, "shots": "",
            } for i in range(n)]
    return rows


def test_report_says_what_pretraining_buys(tmp_path):
    write_predictions(tmp_path / "pred", signal_predictions({("vit", "pretrained"): 2.5, ("vit", "scratch"): 0.3}), {})
    assert main(["report", str(tmp_path / "pred"), "--out", str(tmp_path / "report.html"), "--bootstrap", "200"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "<h2 id='summary'>" in html and "Pretraining is significantly better at: vit, ich, ID, labels 0.1" in html


def test_report_summary_says_whether_the_pretrained_arms_clear_each_floor(tmp_path):
    def summary(systems: dict) -> str:
        write_predictions(tmp_path / "pred", signal_predictions(systems), {})
        html = render_html(evaluate([tmp_path / "pred"], n_bootstrap=200), {})
        return html[html.index("<h2 id='summary'>") : html.index("<h2 id='roc'>")]

    text = summary({("vit", "pretrained"): 2.5, ("vit", "random-init"): 0.0, ("hu-histogram", "hu-histogram"): 4.0})
    assert "<b>The pretrained arms clear the random-init floor everywhere</b>" in text
    assert "CI above 0 at 1 of 1 comparisons" in text
    assert "<b>The pretrained arms do not clear the hu-histogram floor anywhere</b>" in text
    assert "The floor is significantly better at: vit, ich, ID, labels 0.1 (-" in text

    text = summary({("vit", "pretrained"): 2.5, ("weak", "pretrained"): 0.0, ("vit", "random-init"): 0.0})
    assert "<b>The pretrained arms clear the random-init floor only in part</b>" in text
    assert "CI above 0 at 1 of 2 comparisons" in text and "not at: weak, ich, ID, labels 0.1" in text
    assert "<b>No pretrained arm is checked against the hu-histogram floor</b>" in text and "not in this evaluation" in text


def test_report_draws_the_learning_curves_of_a_pretraining_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "online_rankme": 3.0, "online_knn_auroc_ich": 0.52, "online_linear_auroc_ich": 0.50}]
    records += [{"step": s, "loss": 9.0 - s / 100, "dino_loss": 5.5, "ibot_loss": 2.5, "koleo_loss": 1.0,
                 "teacher_cosine": 1.0 - s / 400, "teacher_entropy": 5.5 - s / 200} for s in (10, 20, 100)]
    records.append({"step": 100, "online_rankme": 20.0, "online_knn_auroc_ich": 0.70, "online_linear_auroc_ich": 0.66})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11')  # a torn line
    rows = signal_predictions({("vit", "pretrained"): 1.0}, n=60)
    write_predictions(tmp_path / "pred", rows, {})
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "pred"), "--out", str(out), "--bootstrap", "20", "--pretraining", str(run)]) == 0
    html = out.read_text()
    section = html[html.index("<h2 id='learning-curves'>") : html.index("<h2 id='methods'>")]
    assert "<img" in section and (tmp_path / "report_figures" / "learning_curve_run.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "pred"), "--out", str(out), "--pretraining", str(tmp_path / "nothing")]) == 2
