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
from fmct.errors import InputError
from fmct.eval import metrics as M
from fmct.eval.cohort import Budget
from fmct.eval.evaluate import evaluate, read_evaluation, write_evaluation, write_predictions
from fmct.eval.report import SECTIONS, load_evaluation, render_html, saliency_examples
from fmct.eval.report_figures import figures as draw_figures

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
                    rows.append(
                        {
                            "scan_id": f"{site}/{record[id_column]}",
                            "patient_id": "",
                            "site": site,
                            "split": split,
                            "finding": "abnormal",
                            "label": record["label"],
                            "score": float(value),
                            "model": model,
                            "arm": "scratch" if model == "baseline" else "pretrained",
                            "label_fraction": int(percent.removesuffix("pct")) / 100,
                            "seed": 0,
                            "probability": float(value),
                        }
                    )
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
        row = next(
            m for m in evaluation.metrics if (m["model"], m["label_fraction"], m["group"]) == ("ct_fm", "0.1", group)
        )
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)  # ties included
        assert row["auroc_lo"] < row["auroc"] < row["auroc_hi"] and row["auroc_hi"] - row["auroc_lo"] < 0.12
        assert row["n_scans"] == len(labels) and row["n_pos"] == int(labels.sum())

    # Paired comparison at 100% labels, in-distribution: CT-FM vs scratch, on the same 978 scans.
    comparison = next(
        c
        for c in evaluation.comparisons
        if (c["group"], c["label_fraction"], c["model_a"], c["model_b"]) == ("ID", "1.0", "ct_fm", "baseline")
    )
    labels, ct_fm = _peer_column("SinoCT", "patient_id", "ct_fm_100pct")
    _, baseline = _peer_column("SinoCT", "patient_id", "baseline_100pct")
    assert comparison["n_scans"] == 978
    assert comparison["auroc_diff"] == pytest.approx(
        roc_auc_score(labels, ct_fm) - roc_auc_score(labels, baseline), abs=1e-12
    )
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
    # Every section with something to show is on the page and in the contents; these predictions carry no
    # saliency images and no pretraining log was given, so those two sections are in neither.
    for section in SECTIONS:
        shown = section not in ("examples", "learning-curves")
        assert (f"<h2 id='{section}'>" in page) == shown and (f"<a href='#{section}'>" in page) == shown, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 and all(
        base64.b64decode(i).startswith(b"\x89PNG") for i in images
    )  # ROC, label efficiency, calibration
    assert "f58c89a" in page and "cq500" in page and "sinoct" in page
    assert sorted(p.name for p in (tmp_path / "report_figures").iterdir()) == [
        "calibration_abnormal.png",
        "label_efficiency_abnormal.png",
        "roc_abnormal.png",
    ]
    # No run.json records the cohort: it is told from the predictions, scanners not recorded.
    cohort = page[page.index("<h2 id='cohort'>") : page.index("<h2 id='metrics'>")]
    assert "predictions.csv (evaluated splits only)" in cohort and "not recorded" in cohort
    assert "<td>test (ID)</td><td>sinoct</td><td class='num'>978</td>" in cohort
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
                rows.append(
                    {
                        "scan_id": f"s{i}",
                        "patient_id": f"p{i // 2}",
                        "site": "A",
                        "split": "test",
                        "finding": "ich",
                        "label": labels[i],
                        "score": scores[i],
                        "model": "vit",
                        "arm": arm,
                        "label_fraction": "",
                        "seed": seed,
                        "shots": 8,
                    }
                )
    write_predictions(tmp_path / "pred", rows, {"method": "logistic"})
    assert (
        main(
            ["evaluate", "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "eval"), "--bootstrap", "100"]
        )
        == 0
    )
    evaluation = read_evaluation(tmp_path / "eval")
    pretrained = next(m for m in evaluation.metrics if m["arm"] == "pretrained")
    assert pretrained["budget"] == "8 shots" and pretrained["n_seeds"] == 3 and pretrained["n_patients"] == 40
    per_seed = [
        roc_auc_score(labels, [r["score"] for r in rows if r["arm"] == "pretrained" and r["seed"] == s])
        for s in range(3)
    ]
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
            rows.append(
                {
                    "scan_id": f"s{i}",
                    "patient_id": f"p{i}",
                    "site": "A" if split == "test" else "C",
                    "split": split,
                    "finding": "mass",
                    "label": label,
                    "score": label + rng.normal(),
                    "model": "vit",
                    "arm": "pretrained",
                    "label_fraction": fraction,
                    "seed": 0,
                    "shots": "",
                }
            )
    write_predictions(tmp_path / "pred", rows, {"method": "logistic"})
    assert main(["report", str(tmp_path / "pred"), "--out", str(tmp_path / "report.html"), "--bootstrap", "50"]) == 0
    assert (tmp_path / "report_figures" / "label_efficiency_mass.png").exists()  # drawn for OOD alone


def signal_predictions(
    systems: dict[tuple[str, str], float], n: int = 120, fractions=("0.1",), splits=("test",), seed: int = 2
) -> list[dict]:
    """Predictions of ich by each (model, arm) system on the same ``n`` scans, one seed, at each label fraction:
    score = signal x label + N(0, 1) noise. Scan i has split ``splits[i % len(splits)]`` (site C for ood, else A)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    split = [splits[i % len(splits)] for i in range(n)]
    rows = []
    for (model, arm), signal in systems.items():
        for fraction in fractions:
            scores = signal * labels + rng.normal(size=n)
            rows += [
                {
                    "scan_id": f"s{i}",
                    "patient_id": f"p{i}",
                    "site": "C" if split[i] == "ood" else "A",
                    "split": split[i],
                    "finding": "ich",
                    "label": labels[i],
                    "score": scores[i],
                    "model": model,
                    "arm": arm,
                    "label_fraction": fraction,
                    "seed": 0,
                    "shots": "",
                }
                for i in range(n)
            ]
    return rows


def test_report_says_what_pretraining_buys(tmp_path):
    write_predictions(tmp_path / "pred", signal_predictions({("vit", "pretrained"): 2.5, ("vit", "scratch"): 0.3}), {})
    assert main(["report", str(tmp_path / "pred"), "--out", str(tmp_path / "report.html"), "--bootstrap", "200"]) == 0
    html = (tmp_path / "report.html").read_text()
    summary = _section(html, "summary")
    assert "<b>Pretraining beats scratch at 1 of 1 comparisons</b>" in summary
    assert "Holm-adjusted p &lt; 0.05, as the table bolds" in summary
    # The effects table: vit vs its scratch twin, green (CI above 0) and bold (Holm p < 0.05).
    assert "<td>vit vs vit (scratch)</td><td>ich</td><td>ID</td><td class='num'><span class='up'><b>+" in summary


def test_report_summary_says_whether_the_pretrained_arms_clear_each_floor(tmp_path):
    def summary(systems: dict) -> str:
        write_predictions(tmp_path / "pred", signal_predictions(systems), {})
        html = render_html(evaluate([tmp_path / "pred"], n_bootstrap=200), {})
        return _section(html, "summary")

    text = summary({("vit", "pretrained"): 2.5, ("vit", "random-init"): 0.0, ("hu-histogram", "hu-histogram"): 4.0})
    # One sentence per floor, counting what the effects table bolds (Holm-adjusted p < 0.05).
    assert "<b>Pretrained beats the random-init floor at 1 of 1 comparisons</b>" in text
    assert "<b>Pretrained beats the hu-histogram floor at 0 of 1 comparisons</b>" in text
    assert "the floor is better at 1: vit ich ID 0.1." in text
    assert (
        "<td>vit vs hu-histogram (hu-histogram)</td><td>ich</td><td>ID</td><td class='num'><span class='down'>" in text
    )

    text = summary({("vit", "pretrained"): 2.5, ("weak", "pretrained"): 0.0, ("vit", "random-init"): 0.0})
    assert "<b>Pretrained beats the random-init floor at 1 of 2 comparisons</b>" in text
    assert "<td>weak vs vit (random-init)</td><td>ich</td><td>ID</td><td class='num'><span class='flat'>" in text
    assert (
        "<b>No pretrained arm is checked against the hu-histogram floor</b>" in text
        and "not in this evaluation" in text
    )


def test_report_draws_the_learning_curves_of_a_pretraining_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "online_rankme": 3.0, "online_knn_auroc_ich": 0.52, "online_linear_auroc_ich": 0.50}]
    records += [
        {
            "step": s,
            "loss": 9.0 - s / 100,
            "dino_loss": 5.5,
            "ibot_loss": 2.5,
            "koleo_loss": 1.0,
            "teacher_cosine": 1.0 - s / 400,
            "teacher_entropy": 5.5 - s / 200,
        }
        for s in (10, 20, 100)
    ]
    records.append({"step": 100, "online_rankme": 20.0, "online_knn_auroc_ich": 0.70, "online_linear_auroc_ich": 0.66})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11')  # a torn line
    rows = signal_predictions({("vit", "pretrained"): 1.0}, n=60)
    write_predictions(tmp_path / "pred", rows, {})
    out = tmp_path / "report.html"
    assert (
        main(["report", str(tmp_path / "pred"), "--out", str(out), "--bootstrap", "20", "--pretraining", str(run)]) == 0
    )
    html = out.read_text()
    section = html[html.index("<h2 id='learning-curves'>") : html.index("<h2 id='methods'>")]
    assert "<img" in section and (tmp_path / "report_figures" / "learning_curve_run.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "pred"), "--out", str(out), "--pretraining", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------ the clinician's report
def _section(page: str, section: str) -> str:
    """The HTML of one section: from its heading to the next one."""
    start = page.index(f"<h2 id='{section}'>")
    end = page.find("<h2 id=", start + 1)
    return page[start:] if end < 0 else page[start:end]


def _rows(labels, scores, model="vit", arm="pretrained", split="test", site="A", seed=0, fraction="1.0", **extra):
    return [
        {
            "scan_id": f"{split}{i}",
            "patient_id": f"p{split}{i // 2}",
            "site": site,
            "split": split,
            "finding": "ich",
            "label": int(y),
            "score": float(s),
            "model": model,
            "arm": arm,
            "label_fraction": fraction,
            "seed": seed,
            "shots": "",
            **{k: (v[i] if isinstance(v, np.ndarray) else v) for k, v in extra.items()},
        }
        for i, (y, s) in enumerate(zip(labels, scores))
    ]


def test_cohort_table_per_site_and_split_with_scanners_from_the_store(tmp_path):
    from fmct.eval.cohort import CohortConfig, load_cohort

    store = tmp_path / "store"
    (store / "scans").mkdir(parents=True)
    scanners = {
        "s0": ("GE", "LightSpeed16"),
        "s1": ("GE", "LightSpeed16"),
        "s2": ("GE", "LightSpeed16"),
        "s3": ("", ""),
        "s4": ("SIEMENS", "Definition AS"),
        "s5": ("SIEMENS", "Definition AS"),
        "s6": ("GE", "Revolution"),
        "s7": ("GE", "Revolution"),
        "s8": ("GE", "Revolution"),
        "s9": ("GE", "Revolution"),
    }
    for scan_id, (manufacturer, model) in scanners.items():
        (store / "scans" / f"{scan_id}.json").write_text(
            json.dumps(
                {
                    "scan_id": scan_id,
                    "patient_key": f"k{scan_id}",
                    "source": f"dicom/{scan_id}",
                    "manufacturer": manufacturer,
                    "model": model,
                }
            )
        )
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "scan_id,patient_id,site,split,ich\n"
        "s0,P1,A,train,1\ns1,P1,A,train,1\ns2,P2,A,train,0\ns3,P3,A,train,0\n"
        "s4,P4,A,test,1\ns5,P5,A,test,\n"
        "s6,P6,B,test,0\ns7,P7,B,test,1\ns8,P8,B,test,0\ns9,P8,B,test,0\n"
    )
    cohort = load_cohort(str(labels), list(scanners), "the store", CohortConfig(), store)
    table = cohort.split_counts()["cohort"]
    assert [(r["site"], r["split"], r["all_sites"], r["n_scans"], r["n_patients"]) for r in table] == [
        ("A", "train", False, 4, 3),
        ("A", "test", False, 2, 2),
        ("B", "test", False, 4, 3),
        ("", "test", True, 6, 5),
    ]
    assert table[0]["scanners"] == {"GE LightSpeed16": 3, "not recorded": 1}
    assert table[0]["labels"] == {"ich": {"pos": 2, "neg": 2}} and table[1]["labels"] == {"ich": {"pos": 1, "neg": 0}}
    assert "P1" not in json.dumps(table)  # patients are counted, never named

    rows = [
        cohort.prediction(i, 0, float(i), "vit", "pretrained", Budget(fraction=1.0), 0)
        for i in cohort.rows(0, ("test", "ood"))
    ]
    write_predictions(tmp_path / "pred", rows, {**cohort.split_counts(), "store": str(store)})
    page = render_html(evaluate([tmp_path / "pred"], n_bootstrap=20), {})
    section = _section(page, "cohort")
    assert (
        "<tr><td>train</td><td>A</td><td class='num'>4</td><td class='num'>3</td>"
        "<td class='w'>GE LightSpeed16 (3); not recorded (1)</td>"
        "<td class='num'>2 / 4 (50%)</td></tr>"
    ) in section
    assert "<tr class=total><td>test (ID)</td><td>all sites</td><td class='num'>6</td><td class='num'>5</td>" in section
    assert "from run.json" in section

    # Without the cohort record, the evaluated splits are told from the predictions, scanners from the store
    # run.json names.
    write_predictions(tmp_path / "bare", rows, {"store": str(store)})
    section = _section(render_html(evaluate([tmp_path / "bare"], n_bootstrap=20), {}), "cohort")
    assert (
        "<td>B</td><td class='num'>4</td><td class='num'>3</td><td class='w'>GE Revolution (4)</td>"
        "<td class='num'>1 / 4 (25%)</td>" in section
    )
    assert "<td>train</td>" not in section and "predictions.csv (evaluated splits only)" in section


def test_rows_with_fewer_than_five_of_a_class_are_not_estimable(tmp_path):
    rng = np.random.default_rng(4)
    test_labels = np.r_[np.ones(30), np.zeros(50)]
    ood_labels = np.r_[np.ones(4), np.zeros(40)]  # 4 positives: not estimable
    rows = []
    for model, signal in (("vit", 2.0), ("cnn", 0.5)):
        rows += _rows(test_labels, signal * test_labels + rng.normal(size=80), model=model)
        rows += _rows(ood_labels, signal * ood_labels + rng.normal(size=44), model=model, split="ood", site="C")
    write_predictions(tmp_path / "pred", rows, {})
    evaluation = evaluate([tmp_path / "pred"], n_bootstrap=50)
    ood = [m for m in evaluation.metrics if m["group"] == "OOD"]
    assert len(ood) == 2 and all(
        m["note"] == "not estimable: 4 positives (fewer than 5)" and math.isnan(m["auroc"]) for m in ood
    )
    assert all(not m["note"] and 0.5 < m["auroc"] <= 1 for m in evaluation.metrics if m["group"] == "ID")
    (ood_comparison,) = [c for c in evaluation.comparisons if c["group"] == "OOD"]
    assert ood_comparison["note"].startswith("not estimable") and math.isnan(ood_comparison["p_holm"])
    assert not [r for r in evaluation.roc if r["group"] == "OOD"] and not [
        r for r in evaluation.calibration if r["group"] == "OOD"
    ]

    write_evaluation(evaluation, tmp_path / "eval")
    assert main(["report", str(tmp_path / "eval"), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    metrics = _section(page, "metrics")
    # One line for the site group where no system is estimable, and each row in the table of all metrics.
    assert (
        "<p><b>ich, OOD</b>: <span class='ne'>not estimable: 4 positives (fewer than 5)</span> for every system.</p>"
        in metrics
    )
    assert metrics.count("<span class='ne'>not estimable: 4 positives (fewer than 5)</span>") == 3
    assert "2 of 4 metric rows are <b>not estimable</b>" in _section(page, "summary")
    assert "not estimable" in _section(page, "id-vs-ood") and "not estimable" in _section(page, "comparisons")


def test_comparisons_share_one_bootstrap_for_ci_and_p_and_holm_adjusts_the_table(tmp_path):
    rng = np.random.default_rng(6)
    labels = (rng.random(150) < 0.4).astype(int)
    rows = []
    for seed in range(2):
        mid = 1.2 * labels + rng.normal(size=150)
        rows += _rows(labels, 2.5 * labels + rng.normal(size=150), model="strong", seed=seed)
        rows += _rows(labels, mid, model="mid", seed=seed)
        rows += _rows(labels, mid + rng.normal(0, 0.1, 150), model="weak", seed=seed)  # nearly mid's ranking
    write_predictions(tmp_path / "pred", rows, {})
    evaluation = evaluate([tmp_path / "pred"], n_bootstrap=400)
    assert len(evaluation.comparisons) == 3
    p = np.array([c["p_bootstrap"] for c in evaluation.comparisons])
    order = np.argsort(p)
    expected = np.maximum.accumulate(np.minimum(1, (3 - np.arange(3)) * p[order]))  # Holm by hand, m = 3
    assert [c["p_holm"] for c in np.array(evaluation.comparisons)[order]] == pytest.approx(expected.tolist())
    strong_weak = next(c for c in evaluation.comparisons if (c["model_a"], c["model_b"]) == ("strong", "weak"))
    mid_weak = next(c for c in evaluation.comparisons if {c["model_a"], c["model_b"]} == {"mid", "weak"})
    assert strong_weak["auroc_diff_lo"] > 0 and strong_weak["p_bootstrap"] < 0.05 and strong_weak["p_holm"] < 0.05
    assert mid_weak["auroc_diff_lo"] < 0 < mid_weak["auroc_diff_hi"] and mid_weak["p_bootstrap"] >= 0.05
    for c in evaluation.comparisons:
        assert (c["p_bootstrap"] < 0.05) == (c["auroc_diff_lo"] > 0 or c["auroc_diff_hi"] < 0)
        # The difference is that of the metrics table's seed-averaged AUROCs.
        auroc = {m["model"]: m["auroc"] for m in evaluation.metrics}
        assert c["auroc_diff"] == pytest.approx(auroc[c["model_a"]] - auroc[c["model_b"]], abs=1e-12)

    # Two evaluations in one report: Holm's family is the six comparisons shown.
    write_evaluation(evaluation, tmp_path / "e1")
    for row in rows:
        row["finding"] = "sdh"
    write_predictions(tmp_path / "pred2", rows, {})
    write_evaluation(evaluate([tmp_path / "pred2"], n_bootstrap=400), tmp_path / "e2")
    merged = load_evaluation([tmp_path / "e1", tmp_path / "e2"])
    p = [c["p_bootstrap"] for c in merged.comparisons]
    assert [c["p_holm"] for c in merged.comparisons] == pytest.approx(M.holm(p).tolist())
    page = render_html(merged, {})
    assert "<b>Holm</b>: adjusted over the 6 comparisons of this table" in _section(page, "comparisons")
    assert "<th>p</th><th>p (Holm)</th>" in page


def test_operating_points_on_the_test_set_or_at_thresholds_chosen_on_validation(tmp_path):
    rng = np.random.default_rng(8)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = [1.5 * labels + rng.normal(size=200) for _ in range(2)]
    rows = _rows(labels, scores[0]) + _rows(labels, scores[1], seed=1)
    write_predictions(tmp_path / "test_set", rows, {})
    evaluation = evaluate([tmp_path / "test_set"], n_bootstrap=200)
    (metric,) = evaluation.metrics
    at90 = next(o for o in evaluation.operating_points if o["target_specificity"] == 0.90)
    assert at90["threshold_source"] == "threshold set on the test set (optimistic)"
    # Chosen on the test set in every replicate, the sensitivity is the metrics table's sensitivity_spec90, CI included.
    assert (at90["sensitivity"], at90["sensitivity_lo"], at90["sensitivity_hi"]) == (
        metric["sensitivity_spec90"],
        metric["sensitivity_spec90_lo"],
        metric["sensitivity_spec90_hi"],
    )
    assert 0.9 <= at90["specificity"] < 0.95 and at90["ppv_lo"] < at90["ppv"] < at90["ppv_hi"]
    # Uncalibrated scores: the calibration takes their logistic, and says so.
    expected_ece = np.mean([M.expected_calibration_error(labels, 1 / (1 + np.exp(-s))) for s in scores])
    assert metric["probability_source"] == "logistic of the score (uncalibrated)" and metric["ece"] == pytest.approx(
        expected_ece
    )
    page = render_html(evaluation, {})
    assert "threshold set on the test set (optimistic)</b>: the predictions carry no threshold" in _section(
        page, "operating-points"
    )
    assert "marked <i>uncalibrated</i>" in _section(page, "calibration")

    # Thresholds chosen on validation are on the probability (here the logistic of the score): per seed the
    # (spec90, spec95) thresholds of scores (0.8, 1.4) and (1.0, 1.6).
    def sigmoid(x):
        return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))

    thresholds = {0: (0.8, 1.4), 1: (1.0, 1.6)}
    for row in rows:
        row["threshold_spec90"], row["threshold_spec95"] = (float(sigmoid(t)) for t in thresholds[row["seed"]])
        row["probability"] = float(sigmoid(row["score"]))
    write_predictions(tmp_path / "validated", rows, {})
    evaluation = evaluate([tmp_path / "validated"], n_bootstrap=200)
    at90, at95 = evaluation.operating_points
    assert at90["threshold_source"] == at95["threshold_source"] == "threshold chosen on validation"
    assert at90["threshold"] == pytest.approx(np.mean(sigmoid([0.8, 1.0]))) and at95["threshold"] == pytest.approx(
        np.mean(sigmoid([1.4, 1.6]))
    )
    by_hand = [
        (np.mean(s[labels == 1] >= t), np.mean(s[labels == 0] < t), np.mean(labels[s >= t]), 1 - np.mean(labels[s < t]))
        for s, t in zip(scores, (0.8, 1.0))
    ]
    assert [at90[k] for k in ("sensitivity", "specificity", "ppv", "npv")] == pytest.approx(
        np.mean(by_hand, axis=0).tolist()
    )
    assert evaluation.metrics[0]["probability_source"] == "probability column"
    assert evaluation.metrics[0]["ece"] == pytest.approx(expected_ece)  # the same probabilities as the logistic above
    assert "optimistic" not in _section(render_html(evaluation, {}), "operating-points")

    rows[0]["threshold_spec90"] = 0.3  # one fit, two thresholds
    write_predictions(tmp_path / "bad", rows, {})
    with pytest.raises(InputError, match="threshold_spec90 of vit \\(pretrained\\), ich, seed 0"):
        evaluate([tmp_path / "bad"], n_bootstrap=10)
    rows[0]["threshold_spec90"], rows[0]["probability"] = 0.8, 1.5
    write_predictions(tmp_path / "bad", rows, {})
    with pytest.raises(InputError, match="predictions.csv: probability must lie in"):
        evaluate([tmp_path / "bad"], n_bootstrap=10)


def test_label_efficiency_stands_on_the_number_of_labelled_scans(tmp_path):
    rng = np.random.default_rng(9)
    labels = (rng.random(100) < 0.4).astype(int)
    rows, probe_fits, finetune_fits = [], [], []
    for fraction, n_pos, n_neg in (("0.1", 4, 8), ("1.0", 40, 80)):
        for seed in range(2):
            rows += _rows(labels, labels + rng.normal(size=100), fraction=fraction, seed=seed)
            probe_fits.append(
                {
                    "finding": "ich",
                    "seed": seed,
                    "label_fraction": float(fraction),
                    "shots": None,
                    "n_train_pos": n_pos,
                    "n_train_neg": n_neg + 2 * seed,
                }
            )
            finetune_fits.append(
                {
                    "seed": seed,
                    "label_fraction": float(fraction),
                    "shots": None,
                    "per_finding": {"ich": {"n_train_pos": n_pos, "n_train_neg": n_neg + 2 * seed}},
                }
            )
    for name, fits in (("probe", probe_fits), ("finetune", finetune_fits)):
        write_predictions(tmp_path / name, rows, {"fits": fits})
        evaluation = evaluate([tmp_path / name], n_bootstrap=20)
        assert [m["n_train"] for m in evaluation.metrics] == [13, 121]  # mean over seeds of positives + negatives
    figures = draw_figures(evaluation)
    assert {"roc_ich", "label_efficiency_ich", "calibration_ich"} == set(figures)
    page = render_html(evaluation, figures)
    assert "<th>0.1 (13 scans)</th><th>1.0 (121 scans)</th>" in _section(page, "metrics")


def _png_file(path: Path, value: float) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.full((8, 8), value), vmin=0, vmax=1)


def test_saliency_examples_show_the_highest_scoring_true_and_false_positives(tmp_path):
    rng = np.random.default_rng(10)
    labels = (rng.random(60) < 0.4).astype(int)
    scores = 1.2 * labels + rng.normal(size=60)
    rows = _rows(labels, scores)
    write_predictions(tmp_path / "pred", rows, {})
    page = render_html(
        evaluate([tmp_path / "pred"], n_bootstrap=10),
        {},
        saliency_examples(evaluate([tmp_path / "pred"], n_bootstrap=10)),
    )
    assert "<h2 id='examples'>" not in page and "<a href='#examples'>" not in page  # nothing to show: left out

    for i in range(60):
        _png_file(tmp_path / "pred" / "saliency" / f"test{i}" / "ich.png", i / 60)
    (tmp_path / "pred" / "saliency" / "test0" / "ich.png").write_bytes(b"not a png")
    evaluation = evaluate([tmp_path / "pred"], n_bootstrap=10)
    examples = saliency_examples(evaluation)
    threshold = float(M.operating_point_at_specificity(labels, scores, 0.90)["threshold"])
    order = [i for i in np.argsort(-scores) if scores[i] >= threshold and i != 0]
    for kind, label in (("true positive", 1), ("false positive", 0)):
        shown = [e for e in examples if e["kind"] == kind]
        assert [e["scan_id"] for e in shown] == [f"test{i}" for i in order if labels[i] == label][:3]
        assert all(e["threshold_source"] == "threshold set on the test set (optimistic)" for e in shown)
    section = _section(render_html(evaluation, {}, examples), "examples")
    assert section.count("<img") == len(examples) >= 4 and "ich: false positives" in section
    assert f"{examples[0]['scan_id']} (ID), vit (pretrained): score {examples[0]['score']:.3f}" in section


def test_report_escapes_names_and_collapses_provenance(tmp_path):
    rows = signal_predictions({("<script>alert(1)</script>", "pretrained"): 2.0, ("vit", "scratch"): 1.0})
    write_predictions(tmp_path / "pred", rows, {"command": "probe", "note": "<img src=x onerror=alert(2)>"})
    assert main(["report", str(tmp_path / "pred"), "--out", str(tmp_path / "report.html"), "--bootstrap", "30"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page
    provenance = _section(page, "provenance")
    assert provenance.count("<details>") == 2 and "<summary>evaluation settings</summary>" in provenance
    assert page.index("<nav class='toc'>") < page.index("<h2 id='summary'>")
