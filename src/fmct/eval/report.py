"""One self-contained HTML report of evaluated predictions (``fmct report``), written for the
clinician-researcher who decides whether a detector is worth a prospective study.

Sections (each an ``<h2 id=...>``, listed in :data:`SECTIONS` and in the page's table of contents):
``summary`` (what was evaluated; whether the pretrained arms clear each floor of
:data:`fmct.eval.evaluate.FLOORS`, and what pretraining buys over scratch), ``cohort`` (scans, patients,
prevalence per finding and scanner per site and split), ``metrics`` (AUROC, AUPRC, sensitivity at 90% /
95% specificity and ECE with CIs; "not estimable" below 5 positives or negatives), ``roc``,
``label-efficiency`` (AUROC against the number of labelled training scans, log scale, CI bands),
``operating-points`` (sensitivity, specificity, PPV, NPV at 90% / 95% specificity, saying where each
threshold was chosen), ``calibration`` (reliability diagrams with ECE), ``id-vs-ood``, ``comparisons``
(paired AUROC differences: bootstrap CI, raw and Holm-adjusted p), ``examples`` (slices with saliency of
true and false positives, when the predictions folder has them), ``learning-curves`` (pretraining logs),
``methods`` and ``provenance`` (every run.json, collapsed).

The figures are embedded as base64 PNGs, so the page opens alone; they are also written as PNG files
into ``<report name>_figures/`` beside the page. Every name from the inputs is HTML-escaped.

Saliency examples: a predictions folder may hold ``saliency/<scan_id>/<finding>.png`` (an overlay of the
detector's saliency on slices of that scan). For each finding the report then shows up to three true
and three false positives among the scans with such a PNG, at the 90%-specificity operating point of the
folder's largest label budget, first seed.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from fmct import hub
from fmct.atomic import atomic_write_bytes, atomic_write_text
from fmct.errors import InputError
from fmct.eval import metrics as M
from fmct.eval.cohort import NOT_RECORDED
from fmct.eval.evaluate import (
    FLOORS, GROUPS, OPERATING_POINTS, PROBABILITY_COLUMN, THRESHOLD_ON_TEST, THRESHOLD_ON_VALIDATION, Evaluation,
    arm_effects, evaluate, pretraining_effects, read_evaluation, read_predictions, with_holm,
)
from fmct.eval.report_figures import (
    as_float, figures as draw_figures, largest_budget, learning_curve_figure, number, png, read_training_log, system_name,
)

SECTIONS = {
    "summary": "Summary",
    "cohort": "Cohort",
    "metrics": "Detection metrics",
    "roc": "ROC curves",
    "label-efficiency": "Label efficiency",
    "operating-points": "Operating points",
    "calibration": "Calibration",
    "id-vs-ood": "In- vs out-of-distribution",
    "comparisons": "Paired comparisons",
    "examples": "Example slices with saliency",
    "learning-curves": "Pretraining learning curves",
    "methods": "Methods",
    "provenance": "Provenance",
}
EXAMPLES_PER_KIND = 3  # true positives and false positives shown per finding
SALIENCY_TARGET = 0.90  # the operating point (specificity) at which examples are called positive

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1180px;margin:auto;padding:1em 1.5em;
 color:#222;line-height:1.45}
h1{margin-bottom:.1em}h2{border-bottom:2px solid #dde;padding-bottom:.15em;margin-top:1.8em}h3{margin-bottom:.3em}
nav.toc{background:#f6f8fa;border:1px solid #dde;padding:.3em 1.4em .5em;display:inline-block;font-size:14px}
nav.toc ol{margin:.2em 0;padding-left:1.3em;columns:2;column-gap:3em}
.wrap{overflow-x:auto;margin:.4em 0 1em}
table{border-collapse:collapse;font-size:13px}
th{background:#eef1f5;position:sticky;top:0}
td,th{border:1px solid #ccd;padding:3px 7px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even) td{background:#fafbfc}
tr.total td{font-weight:600;background:#f1f3f6}
.ne{color:#9a2b2b;font-style:italic;white-space:nowrap}
.note{background:#fff8e1;border-left:4px solid #e8a900;padding:.35em .8em;margin:.6em 0}
.muted{color:#666;font-size:13px}
figure{display:inline-block;margin:6px 10px 6px 0;vertical-align:top}figure img{max-width:100%;height:auto}
figcaption{font-size:12px;color:#444;max-width:440px}
details{margin:.3em 0}summary{cursor:pointer}
pre{background:#f4f4f4;padding:6px;overflow-x:auto;font-size:12px}
"""


class _Html(str):
    """Markup made here, from escaped parts: :func:`_table` puts it in a cell as it is."""


def load_evaluation(folders: list[str | os.PathLike], n_bootstrap: int = 1000, seed: int = 0) -> Evaluation:
    """Merge evaluation folders (holding metrics.json) and evaluate predictions folders (holding
    predictions.csv) together; Holm's adjustment is recomputed over the merged comparisons (the family shown)."""
    evaluated, predictions = [], []
    for folder in map(Path, folders):
        if (folder / "metrics.json").exists():
            evaluated.append(read_evaluation(folder))
        elif (folder / "predictions.csv").exists():
            predictions.append(folder)
        else:
            raise InputError(f"{folder}: neither an evaluation folder (metrics.json) nor a predictions folder (predictions.csv)")
    if predictions:
        evaluated.append(evaluate(predictions, n_bootstrap=n_bootstrap, seed=seed))
    merged = {name: [row for e in evaluated for row in getattr(e, name)]
              for name in ("metrics", "comparisons", "roc", "runs", "operating_points", "calibration", "cohorts")}
    merged["comparisons"] = with_holm(merged["comparisons"])
    return Evaluation(settings=evaluated[0].settings, **merged)


def write_report(
    folders: list[str | os.PathLike], out: str | os.PathLike, n_bootstrap: int = 1000, seed: int = 0,
    pretraining: list[str | os.PathLike] = (),
) -> Path:
    """Write the HTML report of ``folders`` to ``out`` (and its PNGs beside it); return the page's path.

    ``pretraining``: runs, model folders or shipped model names whose pretraining logs are drawn as
    learning curves (loss terms, teacher statistics, online validation AUROC and RankMe by step).
    """
    out = Path(out)
    evaluation = load_evaluation(folders, n_bootstrap=n_bootstrap, seed=seed)
    figures = draw_figures(evaluation)
    for spec in pretraining:
        log = hub.training_log(spec)
        figures[f"learning_curve_{Path(str(spec)).name}"] = png(learning_curve_figure(read_training_log(log), str(spec)))
    figure_dir = out.with_name(out.stem + "_figures")
    for name, data in figures.items():
        atomic_write_bytes(figure_dir / f"{name}.png", data)
    atomic_write_text(out, render_html(evaluation, figures, saliency_examples(evaluation)))
    return out


# ------------------------------------------------------------------------------ saliency examples
def saliency_examples(evaluation: Evaluation, per_kind: int = EXAMPLES_PER_KIND) -> list[dict]:
    """True and false positives with a saliency PNG, from every predictions folder that has ``saliency/``.

    Per folder and finding: the rows of its largest label budget, first seed, first system, of the
    evaluated splits. A scan is called positive at the 90%-specificity threshold: the folder's
    ``threshold_spec90`` when it has one, else the one set on that site group's test scans. Returns dicts
    ``finding, kind, scan_id, group, system, score, threshold, threshold_source, png`` (the file's bytes),
    the highest scores first.
    """
    examples = []
    for run in evaluation.runs:
        folder = Path(run["path"])
        if not (folder / "saliency").is_dir():
            continue
        c = read_predictions(folder).columns
        for finding in sorted(set(c["finding"].tolist())):
            rows = np.flatnonzero((c["finding"] == finding) & np.isin(c["split"], list(GROUPS)))
            if not rows.size:
                continue
            fraction, shots = largest_budget([{"label_fraction": c["label_fraction"][i], "shots": c["shots"][i]} for i in rows])
            rows = rows[(c["label_fraction"][rows] == fraction) & (c["shots"][rows] == shots)]
            first = rows[0]
            seed = min(set(c["seed"][rows].tolist()), key=lambda s: (len(s), s))
            rows = rows[(c["seed"][rows] == seed) & (c["model"][rows] == c["model"][first]) & (c["arm"][rows] == c["arm"][first])]
            system = system_name({"model": c["model"][first], "arm": c["arm"][first]})
            for split, group in GROUPS.items():
                mine = rows[c["split"][rows] == split]
                examples += _examples_of(folder, finding, group, system, c, mine, per_kind)
    return examples


def _examples_of(folder: Path, finding: str, group: str, system: str, c: dict, rows: np.ndarray, per_kind: int) -> list[dict]:
    labels, scores = c["label"][rows], c["score"][rows]
    if M.not_estimable_reason(int(np.sum(labels == 1)), int(np.sum(labels == 0))):
        return []
    given = c[OPERATING_POINTS[SALIENCY_TARGET]][rows]
    if np.isfinite(given).all():
        threshold, source = float(given[0]), THRESHOLD_ON_VALIDATION
    else:
        threshold = float(M.operating_point_at_specificity(labels, scores, SALIENCY_TARGET)["threshold"])
        source = THRESHOLD_ON_TEST
    found = []
    for kind, label in (("true positive", 1), ("false positive", 0)):
        called = [i for i in np.argsort(-scores, kind="stable") if labels[i] == label and scores[i] >= threshold]
        shown = 0
        for i in called:
            if shown == per_kind:
                break
            path = _saliency_png(folder, c["scan_id"][rows[i]], finding)
            if path is None:
                continue
            found.append({"finding": finding, "kind": kind, "scan_id": str(c["scan_id"][rows[i]]), "group": group,
                          "system": system, "score": float(scores[i]), "threshold": threshold,
                          "threshold_source": source, "png": path.read_bytes()})
            shown += 1
    return found


def _saliency_png(folder: Path, scan_id: str, finding: str) -> Path | None:
    """``folder/saliency/<scan_id>/<finding>.png`` when it is a PNG; names that could leave the folder never match."""
    if any(not name or name in (".", "..") or Path(name).name != name or "\\" in name for name in (scan_id, finding)):
        return None
    path = folder / "saliency" / scan_id / f"{finding}.png"
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return path if handle.read(8) == b"\x89PNG\r\n\x1a\n" else None


# ------------------------------------------------------------------------------------------ HTML
def _esc(value) -> str:
    return html.escape(str(value))


def _with_ci(row: dict, name: str, digits: int = 3) -> str:
    return f"{number(row.get(name), digits)} [{number(row.get(name + '_lo'), digits)}, {number(row.get(name + '_hi'), digits)}]"


def _not_estimable(note: str) -> _Html:
    return _Html(f"<span class='ne'>{_esc(note)}</span>")


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), totals: set[int] = frozenset()) -> str:
    """An HTML table; cells are escaped unless they are :class:`_Html`; ``numeric`` columns align right,
    ``totals`` rows are bold."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = "".join(
            f"<td{' class=num' if i in numeric else ''}>{c if isinstance(c, _Html) else _esc(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr{' class=total' if r in totals else ''}>{cells}</tr>")
    return f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _image(name: str, data: bytes, caption: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    text = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{encoded}">{text}</figure>'


def _p_text(value, n_bootstrap: int) -> str:
    """A bootstrap p-value: 0 means every replicate fell on one side, i.e. p below 1 / R."""
    p = as_float(value)
    if p != p:
        return "n/a"
    return f"< {1 / max(1, n_bootstrap):.2g}" if p == 0 else f"{p:.3f}"


def _heading(section: str) -> str:
    return f"<h2 id='{section}'>{_esc(SECTIONS[section])}</h2>"


def _where(e: dict) -> str:
    """Where an effect of :func:`fmct.eval.evaluate.arm_effects` was measured, and its AUROC difference [CI], as HTML."""
    return _esc(f"{e['model']}, {e['finding']}, {e['group']}, labels {e['budget']} "
                f"({e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}])")


def _holm_count(effects: list[dict]) -> str:
    surviving = sum(1 for e in effects if as_float(e.get("p_holm")) < 0.05)
    return f"{surviving} of them with a Holm-adjusted p < 0.05"


def _summary(evaluation: Evaluation, level: int) -> list[str]:
    """The report's first section: what was evaluated, whether the pretrained arms clear each floor, then
    what pretraining buys."""
    lines = [_heading("summary"), _evaluated(evaluation)]
    arms = {row["arm"] for row in evaluation.metrics}
    for floor, what in FLOORS.items():
        lines.append(_floor_verdict(evaluation.comparisons, floor, what, arms, level))
    return lines + _pretraining_summary(evaluation.comparisons, level)


def _evaluated(evaluation: Evaluation) -> str:
    """One paragraph: findings, systems, and the test scans of each site group."""
    systems = sorted({system_name(r) for r in evaluation.metrics})
    sizes = []
    for finding in sorted({r["finding"] for r in evaluation.metrics}):
        for group in ("ID", "OOD"):
            rows = [r for r in evaluation.metrics if (r["finding"], r["group"]) == (finding, group)]
            if rows:
                widest = max(rows, key=lambda r: r["n_scans"])
                sizes.append(f"{finding} {group}: {widest['n_scans']} scans of {widest['n_patients']} patients, "
                             f"{widest['n_pos']} positive (sites {widest['sites'] or 'not named'})")
    not_estimable = sum(1 for r in evaluation.metrics if r.get("note"))
    text = (f"<p><b>{len(systems)} systems</b> ({_esc(', '.join(systems))}) on these test sets: {_esc('; '.join(sizes))}. "
            "ID: the in-distribution test split; OOD: test scans of sites held out of training.</p>")
    if not_estimable:
        text += (f"<p class='note'>{not_estimable} of {len(evaluation.metrics)} metric rows are <b>not estimable</b> "
                 f"(fewer than {M.MIN_PER_CLASS} positive or negative test scans) and show no AUROC.</p>")
    return text


def _floor_verdict(comparisons: list[dict], floor: str, what: str, arms: set[str], level: int) -> str:
    """One paragraph: do the pretrained arms clear ``floor`` (AUROC difference with its paired CI above 0)?"""
    floor_name, what = f"the {_esc(floor)} floor", _esc(what)
    if "pretrained" not in arms:
        return f"<p>No pretrained arm in this evaluation: nothing to check against {floor_name} ({what}).</p>"
    if floor not in arms:
        return f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): it is not in this evaluation.</p>"
    effects = arm_effects(comparisons, floor)
    if not effects:
        return (f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): they never scored the same "
                "scans at the same label budget with enough positives and negatives.</p>")
    cleared = [e for e in effects if e["low"] > 0]
    below = [_where(e) for e in effects if e["high"] < 0]
    counted = (f"AUROC difference pretrained - {_esc(floor)} with its {level}% paired-bootstrap CI above 0 at "
               f"{len(cleared)} of {len(effects)} comparisons (finding x site group x label budget; "
               f"{_holm_count(cleared)})")
    if len(cleared) == len(effects):
        verdict = f"<b>The pretrained arms clear {floor_name} everywhere</b> ({what}): {counted}."
    elif not cleared:
        verdict = f"<b>The pretrained arms do not clear {floor_name} anywhere</b> ({what}): {counted}."
    else:
        verdict = (f"<b>The pretrained arms clear {floor_name} only in part</b> ({what}): {counted}; not at: "
                   + "; ".join(_where(e) for e in effects if e["low"] <= 0) + ".")
    if below:
        verdict += f" The floor is significantly better at: {'; '.join(below)}."
    return f"<p>{verdict}</p>"


def _pretraining_summary(comparisons: list[dict], level: int) -> list[str]:
    """The answer to "what does pretraining buy?": every budget where a pretrained model and its scratch
    twin differ with the paired CI clear of 0, or a plain statement that none does."""
    effects = pretraining_effects(comparisons)
    if not effects:
        return []
    better = [e for e in effects if e["low"] > 0]
    worse = [_where(e) for e in effects if e["high"] < 0]
    lines = ["<h3>Pretrained vs scratch</h3>",
             f"<p>{len(effects)} paired comparisons of a pretrained model with the same architecture trained from scratch "
             f"(AUROC difference pretrained - scratch, {level}% paired-bootstrap CI).</p>"]
    lines.append(
        "<p>Pretraining is significantly better at: " + "; ".join(map(_where, better)) + f" ({_holm_count(better)}).</p>" if better
        else "<p><b>At no finding, label budget or site group is the pretrained model significantly better than "
             "scratch in this evaluation.</b></p>"
    )
    if worse:
        lines.append("<p>Scratch is significantly better at: " + "; ".join(worse) + ".</p>")
    return lines


def _cohort(evaluation: Evaluation) -> list[str]:
    lines = [_heading("cohort")]
    if not evaluation.cohorts:
        return lines + ["<p>This evaluation folder was written before fmct recorded cohorts: run <code>fmct evaluate</code> "
                        "again on its predictions to see scans, patients, prevalence and scanners per site and split.</p>"]
    lines.append("<p>Every scan the predictions folders know of, per site and split (train and val only when run.json "
                 "records them). Prevalence: positive scans / scans with a known label. Scanner: manufacturer and "
                 "model from the store's manifest (number of scans).</p>")
    for table in evaluation.cohorts:
        rows, totals = [], set()
        findings = sorted({f for row in table["rows"] for f in row["labels"]})
        splits = []
        for row in table["rows"]:
            if row["split"] not in splits:
                splits.append(row["split"])
        for split in splits:
            mine = [row for row in table["rows"] if row["split"] == split]
            rows += [_cohort_cells(row["split"], row["site"] or "(no site)", [row], findings) for row in mine]
            if len(mine) > 1:
                totals.add(len(rows))
                rows.append(_cohort_cells(split, "all sites", mine, findings))
        folders = ", ".join(Path(f).name or f for f in table["folders"])
        lines.append(f"<h3>{_esc(folders)}</h3><p class='muted'>from {_esc(table['source'])}</p>")
        lines.append(_table(["split", "site", "scans", "patients", "scanner (scans)", *[f"{f}: positive / labelled" for f in findings]],
                            rows, numeric={2, 3, *range(5, 5 + len(findings))}, totals=totals))
    return lines


def _cohort_cells(split: str, site: str, rows: list[dict], findings: list[str]) -> list:
    scanners: dict[str, int] = {}
    for row in rows:
        for name, n in row["scanners"].items():
            scanners[name] = scanners.get(name, 0) + n
    prevalence = []
    for finding in findings:
        pos = sum(row["labels"].get(finding, {}).get("pos", 0) for row in rows)
        known = pos + sum(row["labels"].get(finding, {}).get("neg", 0) for row in rows)
        prevalence.append(f"{pos} / {known} ({100 * pos / known:.0f}%)" if known else "no labels")
    scanner_text = "; ".join(f"{name} ({n})" for name, n in sorted(scanners.items(), key=lambda kv: (kv[0] == NOT_RECORDED, -kv[1])))
    named = {"test": "test (ID)", "ood": "ood (OOD)"}
    return [named.get(split, split), site, sum(r["n_scans"] for r in rows), sum(r["n_patients"] for r in rows),
            scanner_text or NOT_RECORDED, *prevalence]


def _metrics(evaluation: Evaluation, level: int) -> list[str]:
    lines = [_heading("metrics"),
             f"<p>Per finding, site group, system and label budget, each with its {level}% CI. Sensitivities at the "
             "threshold that reaches 90% / 95% specificity on these scans. ECE: expected calibration error of the "
             f"probabilities (see <a href='#calibration'>calibration</a>). A row with fewer than {M.MIN_PER_CLASS} positive "
             "or negative scans is <span class='ne'>not estimable</span>.</p>"]
    rows = []
    for r in evaluation.metrics:
        cells = [r["finding"], r["group"], system_name(r), r["budget"], number(r.get("n_train"), 0),
                 f"{r['n_scans']} ({r['n_pos']} / {r['n_neg']})", r["n_seeds"]]
        if r.get("note"):
            cells += [_not_estimable(r["note"])] + ["—"] * 5
        else:
            cells += [_with_ci(r, "auroc"), _with_ci(r, "auprc"), _with_ci(r, "sens_at_spec90"), _with_ci(r, "sens_at_spec95"),
                      _with_ci(r, "ece"), number(r["auroc_seed_sd"])]
        rows.append(cells)
    lines.append(_table(["finding", "group", "model (arm)", "label budget", "labelled training scans", "test scans (pos / neg)",
                         "seeds", "AUROC", "AUPRC", "sens @ 90% spec", "sens @ 95% spec", "ECE", "AUROC sd over seeds"],
                        rows, numeric={4, 5, 6, 7, 8, 9, 10, 11, 12}))
    return lines


def _figure_section(section: str, figures: dict[str, bytes], prefix: str, intro: str, empty: str) -> list[str]:
    shown = [_image(name, data) for name, data in figures.items() if name.startswith(prefix)]
    return [_heading(section), intro, *(shown or [f"<p>{empty}</p>"])]


def _operating_points(evaluation: Evaluation, level: int) -> list[str]:
    lines = [_heading("operating-points")]
    if not evaluation.operating_points:
        return lines + ["<p>This evaluation has no operating points (written by an older fmct evaluate).</p>"]
    on_test = any(r["threshold_source"] == THRESHOLD_ON_TEST for r in evaluation.operating_points)
    lines.append(f"<p>What a reader of the detector's calls would see at each threshold, at the largest label budget of "
                 f"each finding, mean over seeds with {level}% CIs. PPV and NPV hold at the prevalence of these test scans "
                 "only. Every budget: operating_points.csv of <code>fmct evaluate</code>.</p>")
    if on_test:
        lines.append(f"<p class='note'>Rows marked <b>{_esc(THRESHOLD_ON_TEST)}</b>: the predictions carry no threshold chosen "
                     "on validation (columns threshold_spec90 / threshold_spec95), so each threshold was set on the very "
                     "scans it is judged on, and chosen again in every bootstrap replicate. Expect sensitivity and PPV "
                     "to be lower on new scans.</p>")
    rows = []
    for finding in sorted({r["finding"] for r in evaluation.operating_points}):
        mine = [r for r in evaluation.operating_points if r["finding"] == finding]
        fraction, shots = largest_budget(mine)
        for r in mine:
            if (r["label_fraction"], r["shots"]) != (fraction, shots):
                continue
            cells = [finding, r["group"], system_name(r), r["budget"], f"{100 * as_float(r['target_specificity']):.0f}%",
                     f"{r['n_pos']} / {r['n_scans']} ({100 * r['n_pos'] / max(1, r['n_scans']):.0f}%)"]
            if r.get("note"):
                cells += [_not_estimable(r["note"])] + ["—"] * 5
            else:
                cells += [f"{number(r['threshold'])} ({r['threshold_source']})",
                          *[_with_ci(r, name) for name in M.OPERATING_POINT_NAMES]]
            rows.append(cells)
    lines.append(_table(["finding", "group", "model (arm)", "label budget", "target specificity", "prevalence",
                         "threshold on score (where chosen)", "sensitivity", "specificity", "PPV", "NPV"],
                        rows, numeric={4, 5, 7, 8, 9, 10}))
    return lines


def _calibration(evaluation: Evaluation, figures: dict[str, bytes]) -> list[str]:
    sources = {r.get("probability_source") for r in evaluation.metrics if not r.get("note")}
    intro = ("<p>Reliability diagrams at the largest label budget: per bin of predicted probability (10 equal-width bins), "
             "the observed share of positive scans; on the dotted diagonal a probability means what it says. Marker area: "
             "the bin's share of the scans. ECE: the scan-weighted mean distance from the diagonal, with its 95% CI.</p>")
    if sources - {PROBABILITY_COLUMN}:
        intro += ("<p class='note'>Dashed lines: the predictions have no probability column, so the probability drawn is "
                  "the logistic of the score, <b>uncalibrated</b>: a logit of a probe or head trained on a re-balanced "
                  "subset is not the chance that a scan is positive.</p>")
    return _figure_section("calibration", figures, "calibration_", intro, "No estimable row to draw.")


def _id_vs_ood(evaluation: Evaluation) -> list[str]:
    paired: dict[tuple, dict] = {}
    for row in evaluation.metrics:
        paired.setdefault((system_name(row), row["finding"], row["budget"]), {})[row["group"]] = row
    rows = []
    for (system, finding, budget), by_group in paired.items():
        in_d, out_d = by_group.get("ID"), by_group.get("OOD")

        def cell(row):
            if row is None:
                return "n/a"
            return _not_estimable(row["note"]) if row.get("note") else _with_ci(row, "auroc")

        both = in_d and out_d and not in_d.get("note") and not out_d.get("note")
        drop = number(as_float(out_d["auroc"]) - as_float(in_d["auroc"])) if both else "n/a"
        rows.append([system, finding, budget, cell(in_d), in_d["sites"] if in_d else "", cell(out_d),
                     out_d["sites"] if out_d else "", drop])
    return [_heading("id-vs-ood"),
            "<p>AUROC on the in-distribution test split and on the held-out sites, and the change (OOD - ID).</p>",
            _table(["model (arm)", "finding", "label budget", "AUROC ID", "ID sites", "AUROC OOD", "OOD sites", "OOD - ID"],
                   rows, numeric={3, 5, 7})]


def _comparisons(evaluation: Evaluation, level: int) -> list[str]:
    n_bootstrap = int(evaluation.settings.get("n_bootstrap") or 0)
    family = sum(1 for c in evaluation.comparisons if math.isfinite(as_float(c.get("p_holm"))))
    lines = [_heading("comparisons"),
             f"<p>Every two systems on the scans both scored, at the same label budget: the difference of their "
             f"seed-averaged AUROCs (a - b) with its {level}% CI and two-sided p-value from the <b>same</b> paired "
             f"patient-level bootstrap ({n_bootstrap} resamples), so the CI excludes 0 exactly when p &lt; "
             f"{1 - level / 100:.2f}. Holm: adjusted over the {family} comparisons of this table (family-wise error "
             f"rate); a difference to rely on has Holm p &lt; {1 - level / 100:.2f}.</p>"]
    rows = []
    for c in evaluation.comparisons:
        cells = [c["finding"], c["group"], c["budget"], f"{c['model_a']} ({c['arm_a']})", f"{c['model_b']} ({c['arm_b']})",
                 f"{c['n_scans']} ({c.get('n_pos', '?')} / {c.get('n_neg', '?')})"]
        if c.get("note"):
            cells += [_not_estimable(c["note"])] + ["—"] * 4
        else:
            holm_p = as_float(c.get("p_holm"))
            holm_text = _p_text(holm_p, n_bootstrap)
            cells += [number(c["auroc_a"]), number(c["auroc_b"]), _with_ci(c, "auroc_diff"),
                      _p_text(c["p_bootstrap"], n_bootstrap), _Html(f"<b>{_esc(holm_text)}</b>") if holm_p < 0.05 else holm_text]
        rows.append(cells)
    lines.append(_table(["finding", "group", "label budget", "a", "b", "scans (pos / neg)", "AUROC a", "AUROC b",
                         f"a - b [{level}% CI]", "p", "p (Holm)"], rows, numeric={5, 6, 7, 8, 9, 10}))
    return lines


def _examples(examples: list[dict]) -> list[str]:
    lines = [_heading("examples")]
    if not examples:
        return lines + ["<p>No saliency images are available: none of the predictions folders holds "
                        "<code>saliency/&lt;scan_id&gt;/&lt;finding&gt;.png</code>.</p>"]
    lines.append(f"<p>Scans called positive at the {100 * SALIENCY_TARGET:.0f}%-specificity threshold, the highest scores "
                 f"first, up to {EXAMPLES_PER_KIND} true and {EXAMPLES_PER_KIND} false positives per finding and site group: "
                 "where the detector looked when it was right, and when it was wrong.</p>")
    for finding in sorted({e["finding"] for e in examples}):
        for kind in ("true positive", "false positive"):
            shown = [e for e in examples if (e["finding"], e["kind"]) == (finding, kind)]
            if not shown:
                continue
            lines.append(f"<h3>{_esc(finding)}: {kind}s</h3>")
            lines += [_image(f"{e['scan_id']} {finding}", e["png"],
                             f"{e['scan_id']} ({e['group']}), {e['system']}: score {e['score']:.3f} >= threshold "
                             f"{e['threshold']:.3f} ({e['threshold_source']})") for e in shown]
    return lines


def _methods(evaluation: Evaluation, level: int) -> list[str]:
    settings = evaluation.settings
    return [_heading("methods"), "<ul>",
            f"<li><b>Confidence intervals</b> ({level}%): patient-level bootstrap, {_esc(settings.get('n_bootstrap'))} resamples "
            f"(seed {_esc(settings.get('seed'))}): each resample draws patients with replacement and keeps all their scans. "
            "Percentile intervals from the order statistics of the replicates.</li>",
            "<li><b>Seeds</b>: each seed is one training subset and fit. Every metric is computed per seed and averaged; "
            "each bootstrap replicate averages the seeds on the same resampled patients.</li>",
            f"<li><b>p-values</b>: {_esc(settings.get('p_value_method', 'paired patient-level bootstrap'))}. The p-value is "
            "twice the share of replicates on the far side of 0; shown as &lt; 1/R when none is.</li>",
            f"<li><b>Not estimable</b>: fewer than {M.MIN_PER_CLASS} positive or negative scans; no metric is reported.</li>",
            f"<li><b>Operating points</b>: at 90% and 95% target specificity; {_esc(THRESHOLD_ON_VALIDATION)} when the predictions "
            f"carry threshold_spec90 / threshold_spec95, else {_esc(THRESHOLD_ON_TEST)}.</li>",
            "<li><b>Calibration</b>: 10 equal-width bins; the probability column when present, else the logistic of the score "
            "(uncalibrated).</li>", "</ul>"]


def _provenance(evaluation: Evaluation) -> list[str]:
    lines = [_heading("provenance"),
             "<p>The config and model identity behind each predictions folder (its run.json), and the evaluation's settings.</p>",
             f"<details><summary>evaluation settings</summary><pre>{_esc(json.dumps(evaluation.settings, indent=2, sort_keys=True))}</pre></details>"]
    for run in evaluation.runs:
        record = run["run"]
        what = ", ".join(str(record[k]) for k in ("command", "model", "arm") if record.get(k))
        lines.append(f"<details><summary>{_esc(run['path'])}{' — ' + _esc(what) if what else ''}</summary>"
                     f"<pre>{_esc(json.dumps(record, indent=2, sort_keys=True))}</pre></details>")
    return lines


def render_html(evaluation: Evaluation, figures: dict[str, bytes], examples: list[dict] = ()) -> str:
    """The report page as one HTML string with the figures (and saliency ``examples`` of
    :func:`saliency_examples`) inlined."""
    level = int(round(100 * evaluation.settings.get("level", 0.95)))
    toc = "".join(f"<li><a href='#{key}'>{_esc(title)}</a></li>" for key, title in SECTIONS.items())
    learning = [_image(n, data) for n, data in figures.items() if n.startswith("learning_curve_")]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fmct report</title><style>{CSS}</style></head><body>",
        "<h1>fmct report</h1>",
        f"<p class='muted'>{len(evaluation.runs)} predictions folder(s); {level}% CIs from a patient-level bootstrap. "
        "ID: in-distribution test split; OOD: test scans of held-out sites.</p>",
        f"<nav class='toc'><b>Contents</b><ol>{toc}</ol></nav>",
        *_summary(evaluation, level),
        *_cohort(evaluation),
        *_metrics(evaluation, level),
        *_figure_section("roc", figures, "roc_", "<p>ROC curves at the largest label budget, averaged over seeds (mean "
                         "sensitivity at each false-positive rate).</p>", "No estimable row to draw."),
        *_figure_section("label-efficiency", figures, "label_efficiency_",
                         "<p>AUROC against the number of labelled scans the detector was trained on (log scale; the band "
                         f"is the {level}% CI, the dotted line chance).</p>",
                         "Only one label budget was evaluated: no curve to draw."),
        *_operating_points(evaluation, level),
        *_calibration(evaluation, figures),
        *_id_vs_ood(evaluation),
        *_comparisons(evaluation, level),
        *_examples(list(examples)),
        _heading("learning-curves"),
        *(learning or ["<p>No pretraining log was given (fmct report --pretraining RUN|MODEL).</p>"]),
        *_methods(evaluation, level),
        *_provenance(evaluation),
        "</body></html>",
    ]
    return "\n".join(parts)
