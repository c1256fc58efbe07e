"""One self-contained HTML report of evaluated predictions (``fmct report``), written for the
clinician-researcher who decides whether a detector is worth a prospective study.

Sections (each an ``<h2 id=...>``, listed in :data:`SECTIONS` and in the page's table of contents):
``summary`` (what was evaluated; a warning for every fine-tuned fit that the step cap ended before early
stopping did; whether the pretrained arms clear each floor of :data:`fmct.eval.evaluate.FLOORS`, what
pretraining buys over scratch, and per finding the supervised ceiling of :data:`fmct.eval.evaluate.CEILING`
with the pretrained arms' gap to it at their smallest label budget), ``cohort`` (scans, patients,
prevalence per finding and scanner per site and split), ``metrics`` (AUROC, AUPRC, sensitivity at 90% /
95% specificity and ECE with CIs; "not estimable" below 5 positives or negatives), ``roc``,
``label-efficiency`` (AUROC against the number of labelled training scans, log scale, CI bands; the
ceiling as a dashed horizontal line),
``operating-points`` (sensitivity, specificity, PPV, NPV at 90% / 95% specificity, saying where each
threshold was chosen), ``calibration`` (reliability diagrams with ECE), ``id-vs-ood``, ``comparisons``
(paired AUROC differences: bootstrap CI, raw and Holm-adjusted p; those with the ceiling apart, descriptive),
``examples`` (slices with saliency of
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
    CEILING,
    CEILING_DESCRIPTION,
    ENDED_BY_MAX_STEPS,
    FLOORS,
    GROUPS,
    OPERATING_POINTS,
    PROBABILITY_COLUMN,
    THRESHOLD_ON_TEST,
    THRESHOLD_ON_VALIDATION,
    Evaluation,
    arm_effects,
    budget_name,
    ceiling_effects,
    evaluate,
    holm_family,
    is_ceiling_comparison,
    pretraining_effects,
    read_evaluation,
    read_predictions,
    with_holm,
)
from fmct.eval.report_figures import (
    CEILING_LABEL,
    as_float,
    budget_text,
    largest_budget,
    learning_curve_figure,
    number,
    png,
    system_name,
)
from fmct.eval.report_figures import (
    figures as draw_figures,
)
from fmct.tables import read_jsonl

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
td{white-space:nowrap}td.w{white-space:normal;min-width:14em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even) td{background:#fafbfc}
tr.total td{font-weight:600;background:#f1f3f6}
.ne{color:#9a2b2b;font-style:italic}
.up{color:#11652a}.down{color:#a11d1d}.flat{color:#555}
details>summary{font-weight:600;margin:.4em 0}
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
            raise InputError(
                f"{folder}: neither an evaluation folder (metrics.json) nor a predictions folder (predictions.csv)"
            )
    if predictions:
        evaluated.append(evaluate(predictions, n_bootstrap=n_bootstrap, seed=seed))
    merged = {
        name: [row for e in evaluated for row in getattr(e, name)]
        for name in ("metrics", "comparisons", "roc", "runs", "operating_points", "calibration", "cohorts", "fits")
    }
    merged["comparisons"] = with_holm(merged["comparisons"])
    return Evaluation(settings=evaluated[0].settings, **merged)


def write_report(
    folders: list[str | os.PathLike],
    out: str | os.PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
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
        figures[f"learning_curve_{Path(str(spec)).name}"] = png(learning_curve_figure(read_jsonl(log), str(spec)))
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
            fraction, shots = largest_budget(
                [{"label_fraction": c["label_fraction"][i], "shots": c["shots"][i]} for i in rows]
            )
            rows = rows[(c["label_fraction"][rows] == fraction) & (c["shots"][rows] == shots)]
            first = rows[0]
            seed = min(set(c["seed"][rows].tolist()), key=lambda s: (len(s), s))
            rows = rows[
                (c["seed"][rows] == seed)
                & (c["model"][rows] == c["model"][first])
                & (c["arm"][rows] == c["arm"][first])
            ]
            system = system_name({"model": c["model"][first], "arm": c["arm"][first]})
            for split, group in GROUPS.items():
                mine = rows[c["split"][rows] == split]
                examples += _examples_of(folder, finding, group, system, c, mine, per_kind)
    return examples


def _examples_of(
    folder: Path, finding: str, group: str, system: str, c: dict, rows: np.ndarray, per_kind: int
) -> list[dict]:
    labels, scores = c["label"][rows], c["score"][rows]
    if M.not_estimable_reason(int(np.sum(labels == 1)), int(np.sum(labels == 0))):
        return []
    given = c[OPERATING_POINTS[SALIENCY_TARGET]][rows]
    if np.isfinite(given).all() and np.isfinite(c["probability"][rows]).all():
        # A validation threshold is on the probability: the same scans, ranked alike, on the score's side.
        called = c["probability"][rows] >= float(given[0])
        threshold, source = float(np.min(scores[called])) if called.any() else np.inf, THRESHOLD_ON_VALIDATION
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
            found.append(
                {
                    "finding": finding,
                    "kind": kind,
                    "scan_id": str(c["scan_id"][rows[i]]),
                    "group": group,
                    "system": system,
                    "score": float(scores[i]),
                    "threshold": threshold,
                    "threshold_source": source,
                    "png": path.read_bytes(),
                }
            )
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


def _with_ci(row: dict, name: str, digits: int = 3, signed: bool = False) -> str:
    def text(value) -> str:
        value = as_float(value)
        return "n/a" if value != value else (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}")

    return f"{text(row.get(name))} [{text(row.get(name + '_lo'))}, {text(row.get(name + '_hi'))}]"


def _not_estimable(note: str) -> _Html:
    return _Html(f"<span class='ne'>{_esc(note)}</span>")


def _table(
    header: list[str],
    rows: list[list],
    numeric: set[int] = frozenset(),
    wrap: set[int] = frozenset(),
    totals: set[int] = frozenset(),
) -> str:
    """An HTML table; cells are escaped unless they are :class:`_Html`. Cells do not wrap, except in the
    ``wrap`` columns; ``numeric`` columns align right; ``totals`` rows are bold."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, c in enumerate(row):
            classes = " ".join(name for name, on in (("num", i in numeric), ("w", i in wrap)) if on)
            cells.append(f"<td{f' class={classes!r}' if classes else ''}>{c if isinstance(c, _Html) else _esc(c)}</td>")
        body.append(f"<tr{' class=total' if r in totals else ''}>{''.join(cells)}</tr>")
    return f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _image(name: str, data: bytes, caption: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    text = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{encoded}">{text}</figure>'


def _p_text(value) -> str:
    p = as_float(value)
    if p != p:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _heading(section: str) -> str:
    return f"<h2 id='{section}'>{_esc(SECTIONS[section])}</h2>"


def _budget_label(fraction: str, shots: str, n_train) -> str:
    """A label budget as a column header: ``0.1 (23 scans)``."""
    n = as_float(n_train)
    return budget_name(fraction, shots) + (f" ({n:.0f} scans)" if n == n else "")


def _budgets(rows: list[dict]) -> list[tuple[str, str]]:
    """The (label_fraction, shots) budgets of ``rows``, fractions by size, then shots by size."""
    return sorted(
        {(r["label_fraction"], r["shots"]) for r in rows},
        key=lambda b: (1, float(b[1])) if b[1] else (0, float(b[0] or 0)),
    )


# --------------------------------------------------------------------------------------- summary
def _summary(evaluation: Evaluation, level: int) -> list[str]:
    """The report's first section: the test sets, the fits the step cap ended, whether the pretrained arms
    clear each floor and what pretraining buys (one sentence each), the ceiling per finding, then every
    such difference in one table."""
    lines = [_heading("summary"), *_test_sets(evaluation), *_cut_fits(evaluation)]
    arms = {row["arm"] for row in evaluation.metrics}
    for floor, what in FLOORS.items():
        lines.append(_floor_verdict(evaluation.comparisons, floor, what, arms, level))
    lines += _pretraining_summary(evaluation.comparisons, level)
    lines += _ceiling_summary(evaluation, level)
    return lines + _effects_table(evaluation, level)


def _test_sets(evaluation: Evaluation) -> list[str]:
    systems = list(dict.fromkeys(system_name(r) for r in evaluation.metrics))
    rows = []
    for finding in sorted({r["finding"] for r in evaluation.metrics}):
        for group in ("ID", "OOD"):
            mine = [r for r in evaluation.metrics if (r["finding"], r["group"]) == (finding, group)]
            if mine:
                r = max(mine, key=lambda r: r["n_scans"])
                rows.append(
                    [
                        finding,
                        group,
                        r["sites"] or "not named",
                        r["n_scans"],
                        r["n_patients"],
                        f"{r['n_pos']} ({100 * r['n_pos'] / max(1, r['n_scans']):.0f}%)",
                    ]
                )
    lines = [
        f"<p><b>{len(systems)} systems</b> evaluated: {_esc(', '.join(systems))}. Test sets (ID: the "
        "in-distribution test split; OOD: scans of sites held out of training):</p>",
        _table(["finding", "group", "sites", "test scans", "patients", "positive"], rows, numeric={3, 4, 5}),
    ]
    not_estimable = sum(1 for r in evaluation.metrics if r.get("note"))
    if not_estimable:
        lines.append(
            f"<p class='note'>{not_estimable} of {len(evaluation.metrics)} metric rows are <b>not estimable</b> "
            f"(fewer than {M.MIN_PER_CLASS} positive or negative test scans) and show no AUROC.</p>"
        )
    return lines


def _fit_name(fit: dict) -> str:
    """A fit as the report names it: ``vit (ceiling), label fraction 1.0, seed 0``."""
    return f"{system_name(fit)}, {budget_text(fit['label_fraction'], fit['shots'])}, seed {fit['seed']}"


def _cut_fits(evaluation: Evaluation) -> list[str]:
    """A warning line for each fine-tuned fit that ``max_steps`` ended (not early stopping): its weights are
    those of a model still learning, so it understates what its arm reaches."""
    cut = [f for f in evaluation.fits if f["ended_by"] == ENDED_BY_MAX_STEPS]
    if not cut:
        return []
    items = "".join(
        f"<li>{_esc(_fit_name(f))} was cut by max_steps at {number(f['steps'], 0)} steps: not a converged baseline</li>"
        for f in cut
    )
    return [
        f"<div class='note'><b>{len(cut)} fine-tuned fit(s) ended at the step cap, not by early stopping</b> "
        f"(fmct finetune --max-steps): the validation AUROC had still improved within the early-stopping patience, so "
        f"these models were still learning.<ul>{items}</ul></div>"
    ]


def _holm_better(effects: list[dict]) -> tuple[list[dict], list[dict]]:
    """The effects the table bolds, split by sign: (pretrained better, baseline better), Holm-adjusted p < 0.05."""
    bold = [e for e in effects if as_float(e.get("p_holm")) < 0.05]
    return [e for e in bold if e["diff"] > 0], [e for e in bold if e["diff"] < 0]


def _floor_verdict(comparisons: list[dict], floor: str, what: str, arms: set[str], level: int) -> str:
    """One sentence: at how many comparisons the pretrained arms beat ``floor`` with a Holm-adjusted p < 0.05
    (what the table bolds)."""
    floor_name, what = f"the {_esc(floor)} floor", _esc(what)
    if "pretrained" not in arms:
        return f"<p>No pretrained arm in this evaluation: nothing to check against {floor_name} ({what}).</p>"
    if floor not in arms:
        return (
            f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): it is not in this evaluation.</p>"
        )
    effects = arm_effects(comparisons, floor)
    if not effects:
        return (
            f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): they never scored the same "
            "scans at the same label budget with enough positives and negatives.</p>"
        )
    better, worse = _holm_better(effects)
    verdict = (
        f"<b>Pretrained beats {floor_name} at {len(better)} of {len(effects)} comparisons</b> ({what}; "
        "Holm-adjusted p &lt; 0.05, as the table bolds)"
    )
    if worse:
        verdict += f"; the floor is better at {len(worse)}: {_esc(_places(worse))}"
    return f"<p>{verdict}.</p>"


def _places(effects: list[dict]) -> str:
    """Where effects were measured, briefly: ``vit ich ID 0.1; ...``."""
    return "; ".join(f"{e['model']} {e['finding']} {e['group']} {e['budget']}" for e in effects)


def _pretraining_summary(comparisons: list[dict], level: int) -> list[str]:
    """The answer to "what does pretraining buy?" in one sentence: at how many comparisons a pretrained
    model beats its scratch twin with a Holm-adjusted p < 0.05 (what the table bolds)."""
    effects = pretraining_effects(comparisons)
    if not effects:
        return []
    better, worse = _holm_better(effects)
    text = (
        f"<b>Pretraining beats scratch at {len(better)} of {len(effects)} comparisons</b> (the same architecture "
        "from random init; Holm-adjusted p &lt; 0.05, as the table bolds)"
    )
    if worse:
        text += f"; scratch is better at {len(worse)}: {_esc(_places(worse))}"
    return [f"<p>{text}.</p>"]


def _ceiling_summary(evaluation: Evaluation, level: int) -> list[str]:
    """Per finding, one paragraph on the supervised ceiling: its AUROC [CI] per site group, and each
    pretrained arm's gap to it (pretrained - ceiling, paired CI) at the smallest label budget compared;
    before them, a ceiling fit that the step cap ended flagged as not a valid ceiling. Without a ceiling
    arm, one sentence saying so."""
    ceilings = [r for r in evaluation.metrics if r["arm"] == CEILING]
    if not ceilings:
        return [
            f"<p><b>No supervised ceiling in this evaluation</b> ({_esc(CEILING_DESCRIPTION)}; arm {CEILING}, "
            "from <code>fmct finetune --model scratch --label-fractions 1 --arm ceiling</code>).</p>"
        ]
    lines = []
    cut = [f for f in evaluation.fits if f["arm"] == CEILING and f["ended_by"] == ENDED_BY_MAX_STEPS]
    if cut:
        lines.append(
            f"<p class='note'><b>Not a valid ceiling</b>: {_esc('; '.join(_fit_name(f) for f in cut))} ended at "
            "the step cap, not by early stopping, so it may lie below what all the labels reach and every gap "
            "to it below is understated. Fine-tune it again with a larger --max-steps.</p>"
        )
    effects = ceiling_effects(evaluation.comparisons)
    for finding in sorted({r["finding"] for r in ceilings}):
        mine = [r for r in ceilings if r["finding"] == finding]
        budget = largest_budget(mine)
        mine = [r for r in mine if (r["label_fraction"], r["shots"]) == budget]
        reached = "; ".join(
            f"{_esc(system_name(r))} {r['group']} "
            + (_not_estimable(r["note"]) if r.get("note") else _esc(_with_ci(r, "auroc")))
            for r in mine
        )
        n_train = as_float(mine[0].get("n_train"))
        scans = f", {n_train:.0f} labelled scans" if n_train == n_train else ""
        text = (
            f"<b>Supervised ceiling, {_esc(finding)}</b> ({_esc(CEILING_DESCRIPTION)}; {_esc(budget_text(*budget))}"
            f"{scans}): AUROC [{level}% CI] {reached}."
        )
        gaps = [e for e in effects if e["finding"] == finding]
        if gaps:
            smallest = min(gaps, key=lambda e: _budget_size(e["budget"]))
            at = [e for e in gaps if e["budget"] == smallest["budget"]]
            below = sum(1 for e in at if e["high"] < 0)
            each = "; ".join(
                f"{e['model']} {e['group']} {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]" for e in at
            )
            text += (
                " The pretrained arms' gap to it at "
                f"{_esc(budget_text(smallest['label_fraction'], smallest['shots']))} "
                f"(AUROC difference pretrained - ceiling, {level}% paired-bootstrap CI on the same test scans; "
                f"descriptive, not in Holm's family): {_esc(each)}. "
                f"Below the ceiling (CI under 0) at {below} of {len(at)}."
            )
        else:
            text += (
                " No pretrained arm was compared with it (no shared test scans with enough positives and negatives)."
            )
        lines.append(f"<p>{text}</p>")
    return lines


def _budget_size(budget: str) -> tuple[bool, float]:
    """The order of budget names: label fractions by size, then shots by size."""
    return budget.endswith("shots"), float(budget.split()[0])


def _effects_table(evaluation: Evaluation, level: int) -> list[str]:
    """Every pretrained - baseline difference as one table: a row per (pretrained system, baseline,
    finding, group), a column per label budget (the pretrained system's); green where the CI lies above 0,
    red below. Baselines in the order of the tables: scratch, the ceiling, the floors."""
    effects = [dict(e, baseline="scratch") for e in pretraining_effects(evaluation.comparisons)]
    effects += [dict(e, baseline=CEILING) for e in ceiling_effects(evaluation.comparisons)]
    effects += [
        dict(e, baseline=baseline) for baseline in FLOORS for e in arm_effects(evaluation.comparisons, baseline)
    ]
    if not effects:
        return []
    budgets = sorted({e["budget"] for e in effects}, key=_budget_size)
    cells: dict[tuple, dict] = {}
    for e in effects:
        cells.setdefault((e["model"], e["baseline_model"], e["baseline"], e["finding"], e["group"]), {})[
            e["budget"]
        ] = e
    rows = []
    for (model, baseline_model, baseline, finding, group), by_budget in cells.items():
        row = [f"{model} vs {baseline_model} ({baseline})", finding, group]
        for budget in budgets:
            e = by_budget.get(budget)
            if e is None:
                row.append("—")
                continue
            kind = "up" if e["low"] > 0 else "down" if e["high"] < 0 else "flat"
            text = _esc(f"{e['diff']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]")
            strong = as_float(e.get("p_holm")) < 0.05
            row.append(_Html(f"<span class='{kind}'>{'<b>' + text + '</b>' if strong else text}</span>"))
        rows.append(row)
    return [
        f"<h3>AUROC difference, pretrained - baseline [{level}% CI], by label budget</h3>",
        "<p class='muted'><span class='up'>green</span>: CI above 0 (pretrained better); "
        "<span class='down'>red</span>: "
        "CI below 0 (baseline better); <b>bold</b>: Holm-adjusted p &lt; 0.05. Against the ceiling (trained on all the "
        "labels), each label budget of the pretrained system; descriptive, never bold. Details in "
        "<a href='#comparisons'>paired comparisons</a>.</p>",
        _table(
            ["pretrained vs baseline", "finding", "group", *[f"labels {b}" for b in budgets]],
            rows,
            numeric=set(range(3, 3 + len(budgets))),
        ),
    ]


# ---------------------------------------------------------------------------------------- cohort
def _cohort(evaluation: Evaluation) -> list[str]:
    lines = [_heading("cohort")]
    if not evaluation.cohorts:
        return lines + [
            "<p>This evaluation folder was written before fmct recorded cohorts: run <code>fmct evaluate</code> "
            "again on its predictions to see scans, patients, prevalence and scanners per site and split.</p>"
        ]
    lines.append(
        "<p>Every scan the predictions folders know of, per site and split (train and val only when run.json "
        "records them). Prevalence: positive scans / scans with a known label. Scanner: manufacturer and "
        "model from the store's manifest (number of scans).</p>"
    )
    for table in evaluation.cohorts:
        findings = sorted({f for row in table["rows"] for f in row["labels"]})
        rows = [_cohort_cells(row, findings) for row in table["rows"]]
        totals = {i for i, row in enumerate(table["rows"]) if row.get("all_sites")}
        folders = ", ".join(Path(f).name or f for f in table["folders"])
        lines.append(f"<p class='muted'>Predictions folders {_esc(folders)}; from {_esc(table['source'])}.</p>")
        lines.append(
            _table(
                [
                    "split",
                    "site",
                    "scans",
                    "patients",
                    "scanner (scans)",
                    *[f"{f}: positive / labelled" for f in findings],
                ],
                rows,
                numeric={2, 3, *range(5, 5 + len(findings))},
                wrap={4},
                totals=totals,
            )
        )
    return lines


def _cohort_cells(row: dict, findings: list[str]) -> list:
    prevalence = []
    for finding in findings:
        counts = row["labels"].get(finding, {})
        pos, known = counts.get("pos", 0), counts.get("pos", 0) + counts.get("neg", 0)
        prevalence.append(f"{pos} / {known} ({100 * pos / known:.0f}%)" if known else "no labels")
    scanners = sorted(row["scanners"].items(), key=lambda kv: (kv[0] == NOT_RECORDED, -kv[1], kv[0]))
    named = {"test": "test (ID)", "ood": "ood (OOD)"}
    site = "all sites" if row.get("all_sites") else row["site"] or "(no site)"
    return [
        named.get(row["split"], row["split"]),
        site,
        row["n_scans"],
        row["n_patients"],
        "; ".join(f"{name} ({n})" for name, n in scanners) or NOT_RECORDED,
        *prevalence,
    ]


# --------------------------------------------------------------------------------------- metrics
def _group_heading(rows: list[dict], finding: str, group: str) -> str:
    r = max(rows, key=lambda r: r["n_scans"])
    return (
        f"<h3>{_esc(finding)}, {group}: {r['n_scans']} test scans, {r['n_pos']} positive "
        f"({100 * r['n_pos'] / max(1, r['n_scans']):.0f}%), sites {_esc(r['sites'] or 'not named')}</h3>"
    )


def _by_finding_and_group(rows: list[dict], lines: list[str]):
    """The rows per (finding, site group) that has any; a group whose rows are all not estimable is told in
    one line appended to ``lines`` instead (its heading and reason) and not yielded."""
    for finding in sorted({r["finding"] for r in rows}):
        for group in ("ID", "OOD"):
            mine = [r for r in rows if (r["finding"], r["group"]) == (finding, group)]
            notes = sorted({r.get("note") or "" for r in mine})
            if mine and notes[0]:
                lines.append(
                    f"<p><b>{_esc(finding)}, {group}</b>: {_not_estimable(' / '.join(notes))} for every system.</p>"
                )
            elif mine:
                yield finding, group, mine


def _metrics(evaluation: Evaluation, level: int) -> list[str]:
    lines = [
        _heading("metrics"),
        f"<p>AUROC (mean over training seeds) with its {level}% CI, per system and label budget (in brackets: the "
        f"labelled training scans). Fewer than {M.MIN_PER_CLASS} positive or negative test scans: "
        "<span class='ne'>not estimable</span>. AUPRC, sensitivity at 90% / 95% specificity and calibration error "
        "below, under <i>all metrics</i>.</p>",
    ]
    for finding, group, rows in _by_finding_and_group(evaluation.metrics, lines):
        budgets = _budgets(rows)
        n_train = {(r["label_fraction"], r["shots"]): r.get("n_train") for r in rows}
        by_system: dict[str, dict] = {}
        for r in rows:
            by_system.setdefault(system_name(r), {})[(r["label_fraction"], r["shots"])] = r
        table = []
        for system, cells in by_system.items():
            row = [system]
            for budget in budgets:
                r = cells.get(budget)
                row.append("—" if r is None else _not_estimable(r["note"]) if r.get("note") else _with_ci(r, "auroc"))
            table.append(row)
        lines += [
            _group_heading(rows, finding, group),
            _table(
                ["model (arm)", *[_budget_label(*b, n_train[b]) for b in budgets]],
                table,
                numeric=set(range(1, 1 + len(budgets))),
            ),
        ]
    rows = []
    for r in evaluation.metrics:
        cells = [
            r["finding"],
            r["group"],
            system_name(r),
            r["budget"],
            number(r.get("n_train"), 0),
            f"{r['n_scans']} ({r['n_pos']} / {r['n_neg']})",
            r["n_seeds"],
        ]
        if r.get("note"):
            cells += [_not_estimable(r["note"])] + ["—"] * 5
        else:
            cells += [
                _with_ci(r, "auroc"),
                _with_ci(r, "auprc"),
                _with_ci(r, "sensitivity_spec90"),
                _with_ci(r, "sensitivity_spec95"),
                _with_ci(r, "ece"),
                number(r["auroc_seed_sd"]),
            ]
        rows.append(cells)
    lines.append(
        "<details><summary>All metrics: AUROC, AUPRC, sensitivity at 90% / 95% specificity (threshold set on "
        "these scans), expected calibration error, spread over seeds</summary>"
        + _table(
            [
                "finding",
                "group",
                "model (arm)",
                "label budget",
                "labelled training scans",
                "test scans (pos / neg)",
                "seeds",
                "AUROC",
                "AUPRC",
                "sens @ 90% spec",
                "sens @ 95% spec",
                "ECE",
                "AUROC sd over seeds",
            ],
            rows,
            numeric=set(range(4, 13)),
        )
        + "</details>"
    )
    return lines


def _figure_section(section: str, figures: dict[str, bytes], prefix: str, intro: str, empty: str) -> list[str]:
    shown = [_image(name, data) for name, data in figures.items() if name.startswith(prefix)]
    return [_heading(section), intro, *(shown or [f"<p>{empty}</p>"])]


def _operating_points(evaluation: Evaluation, level: int) -> list[str]:
    lines = [_heading("operating-points")]
    if not evaluation.operating_points:
        return lines + ["<p>This evaluation has no operating points (written by an older fmct evaluate).</p>"]
    lines.append(
        f"<p>What a reader of the detector's calls would see, at the largest label budget, mean over seeds with "
        f"{level}% CIs. PPV and NPV hold at the prevalence of these test scans only. Every budget: "
        "operating_points.csv of <code>fmct evaluate</code>.</p>"
    )
    if any(r["threshold_source"] == THRESHOLD_ON_TEST for r in evaluation.operating_points):
        lines.append(
            f"<p class='note'>Thresholds marked <b>{_esc(THRESHOLD_ON_TEST)}</b>: the predictions carry no threshold "
            "chosen on validation (columns threshold_spec90 / threshold_spec95), so each threshold was set on the "
            "very scans it is judged on, and set again in every bootstrap replicate. Expect sensitivity and PPV "
            f"to be lower on new scans. Thresholds marked <b>{_esc(THRESHOLD_ON_VALIDATION)}</b> were fixed before "
            "these scans were seen.</p>"
        )
    short = {
        THRESHOLD_ON_TEST: "test set, on the score (optimistic)",
        THRESHOLD_ON_VALIDATION: "validation, on the probability",
    }
    for finding, group, rows in _by_finding_and_group(evaluation.operating_points, lines):
        fraction, shots = largest_budget(rows)
        table = []
        for r in rows:
            if (r["label_fraction"], r["shots"]) != (fraction, shots):
                continue
            cells = [system_name(r), f"{100 * as_float(r['target_specificity']):.0f}%"]
            if r.get("note"):
                cells += [_not_estimable(r["note"])] + ["—"] * 5
            else:
                cells += [
                    number(r["threshold"]),
                    short.get(r["threshold_source"], r["threshold_source"]),
                    *[_with_ci(r, name) for name in M.OPERATING_POINT_NAMES],
                ]
            table.append(cells)
        lines += [
            _group_heading(rows, finding, group).replace(
                "</h3>", f", label budget {_esc(budget_name(fraction, shots))}</h3>"
            ),
            _table(
                [
                    "model (arm)",
                    "target specificity",
                    "threshold",
                    "threshold chosen on",
                    "sensitivity",
                    "specificity",
                    "PPV",
                    "NPV",
                ],
                table,
                numeric={1, 2, 4, 5, 6, 7},
            ),
        ]
    return lines


def _calibration(evaluation: Evaluation, figures: dict[str, bytes]) -> list[str]:
    sources = {r.get("probability_source") for r in evaluation.metrics if not r.get("note")}
    intro = (
        "<p>Reliability diagrams at the largest label budget: per bin of predicted probability (10 equal-width bins), "
        "the observed share of positive scans; on the dotted diagonal a probability means what it says. Marker area: "
        "the bin's share of the scans; hollow: fewer than 5 scans, not joined by the line. ECE: the scan-weighted mean "
        "distance from the diagonal (its 95% CI under <a href='#metrics'>all metrics</a>).</p>"
    )
    if sources - {PROBABILITY_COLUMN}:
        intro += (
            "<p class='note'>Dashed lines, marked <i>uncalibrated</i>: the predictions have no probability column, so "
            "the probability drawn is the logistic of the score: a logit of a probe or head trained on a re-balanced "
            "subset is not the chance that a scan is positive.</p>"
        )
    return _figure_section("calibration", figures, "calibration_", intro, "No estimable row to draw.")


def _id_vs_ood(evaluation: Evaluation) -> list[str]:
    paired: dict[tuple, dict] = {}
    for row in evaluation.metrics:
        paired.setdefault((row["finding"], system_name(row), row["budget"]), {})[row["group"]] = row
    rows = []
    for (finding, system, budget), by_group in sorted(paired.items(), key=lambda kv: kv[0][0]):
        in_d, out_d = by_group.get("ID"), by_group.get("OOD")

        def cell(row):
            if row is None:
                return "n/a"
            return _not_estimable(row["note"]) if row.get("note") else _with_ci(row, "auroc")

        both = in_d and out_d and not in_d.get("note") and not out_d.get("note")
        drop = f"{as_float(out_d['auroc']) - as_float(in_d['auroc']):+.3f}" if both else "n/a"
        rows.append([finding, system, budget, cell(in_d), cell(out_d), drop])
    return [
        _heading("id-vs-ood"),
        "<p>AUROC on the in-distribution test split and on the held-out sites, and the change (OOD - ID); the sites "
        "of each group are in the <a href='#summary'>summary</a>.</p>",
        _table(
            ["finding", "model (arm)", "label budget", "AUROC ID", "AUROC OOD", "OOD - ID"], rows, numeric={3, 4, 5}
        ),
    ]


def _comparisons(evaluation: Evaluation, level: int) -> list[str]:
    family = holm_family(evaluation.comparisons)
    primary = [c for c, member in zip(evaluation.comparisons, family) if member]
    ceiling = [c for c, member in zip(evaluation.comparisons, family) if not member and is_ceiling_comparison(c)]
    others = [c for c, member in zip(evaluation.comparisons, family) if not (member or is_ceiling_comparison(c))]
    family = sum(1 for c in primary if math.isfinite(as_float(c.get("p_holm"))))
    n_bootstrap = evaluation.settings.get("n_bootstrap")
    lines = [
        _heading("comparisons"),
        f"<p>Two systems on the scans both scored, at the same label budget: the difference of their seed-averaged "
        f"AUROCs (a - b). Its {level}% CI and its two-sided p-value both come from the difference's standard error "
        f"over the same {_esc(n_bootstrap)} paired patient-level bootstrap resamples, so the CI excludes 0 exactly "
        f"when p &lt; {1 - level / 100:.2f}. <b>Holm</b>: adjusted over the {family} comparisons of this table "
        "(family-wise error rate); rely on a difference whose Holm p is below 0.05 (bold).</p>",
    ]
    lines += _comparison_tables(primary, level, holm=True)
    if ceiling:
        lines.append(
            f"<p><b>Against the supervised ceiling</b> (b: {_esc(CEILING_DESCRIPTION)}; a: each pretrained "
            "system at the label budget shown, on the same test scans). Descriptive: p not adjusted, not in "
            "Holm's family.</p>"
        )
        lines += _comparison_tables(ceiling, level, holm=False)
    if others:
        lines.append(
            f"<details><summary>{len(others)} other pairs (exploratory: p not adjusted, not in Holm's family)"
            "</summary>" + "".join(_comparison_tables(others, level, holm=False)) + "</details>"
        )
    return lines


def _comparison_tables(comparisons: list[dict], level: int, holm: bool) -> list[str]:
    lines = []
    for finding, group, rows in _by_finding_and_group(comparisons, lines):
        table = []
        for c in rows:
            cells = [
                c["budget"],
                f"{c['model_a']} ({c['arm_a']})",
                f"{c['model_b']} ({c['arm_b']})",
                f"{c['n_scans']} ({c.get('n_pos', '?')} / {c.get('n_neg', '?')})",
            ]
            if c.get("note"):
                cells += [_not_estimable(c["note"])] + ["—"] * (4 if holm else 3)
            else:
                cells += [
                    number(c["auroc_a"]),
                    number(c["auroc_b"]),
                    _with_ci(c, "auroc_diff", signed=True),
                    _p_text(c["p_bootstrap"]),
                ]
                if holm:
                    holm_p = as_float(c.get("p_holm"))
                    cells.append(_Html(f"<b>{_esc(_p_text(holm_p))}</b>") if holm_p < 0.05 else _p_text(holm_p))
            table.append(cells)
        lines += [
            f"<h3>{_esc(finding)}, {group}</h3>",
            _table(
                [
                    "label budget",
                    "a",
                    "b",
                    "scans (pos / neg)",
                    "AUROC a",
                    "AUROC b",
                    f"a - b [{level}% CI]",
                    "p",
                    *(["p (Holm)"] if holm else []),
                ],
                table,
                numeric=set(range(3, 9)),
            ),
        ]
    return lines


def _examples(examples: list[dict]) -> list[str]:
    if not examples:  # none of the predictions folders holds saliency/<scan_id>/<finding>.png
        return []
    lines = [_heading("examples")]
    lines.append(
        f"<p>Scans called positive at the {100 * SALIENCY_TARGET:.0f}%-specificity threshold, the highest scores "
        f"first, up to {EXAMPLES_PER_KIND} true and {EXAMPLES_PER_KIND} false positives per finding and site group: "
        "where the detector looked when it was right, and when it was wrong.</p>"
    )
    for finding in sorted({e["finding"] for e in examples}):
        for kind in ("true positive", "false positive"):
            shown = [e for e in examples if (e["finding"], e["kind"]) == (finding, kind)]
            if not shown:
                continue
            lines.append(f"<h3>{_esc(finding)}: {kind}s</h3>")
            lines += [
                _image(
                    f"{e['scan_id']} {finding}",
                    e["png"],
                    f"{e['scan_id']} ({e['group']}), {e['system']}: score {e['score']:.3f} ≥ threshold "
                    f"{e['threshold']:.3f} ({e['threshold_source']})",
                )
                for e in shown
            ]
    return lines


def _methods(evaluation: Evaluation, level: int) -> list[str]:
    settings = evaluation.settings
    return [
        _heading("methods"),
        "<ul>",
        f"<li><b>Confidence intervals</b> ({level}%): patient-level bootstrap, "
        f"{_esc(settings.get('n_bootstrap'))} resamples (seed {_esc(settings.get('seed'))}): "
        "each resample draws patients with replacement and keeps all their scans; "
        "percentile intervals of the replicates.</li>",
        "<li><b>Seeds</b>: each seed is one training subset and fit. Every metric is computed per seed and averaged; "
        "each bootstrap replicate averages the seeds on the same resampled patients.</li>",
        f"<li><b>Comparisons</b>: {_esc(settings.get('p_value_method', 'paired patient-level bootstrap'))}.</li>",
        f"<li><b>Not estimable</b>: fewer than {M.MIN_PER_CLASS} positive or negative scans; "
        "no metric is reported.</li>",
        "<li><b>Operating points</b>: at 90% and 95% target specificity; "
        f"{_esc(THRESHOLD_ON_VALIDATION)} when the predictions "
        f"carry threshold_spec90 / threshold_spec95, else {_esc(THRESHOLD_ON_TEST)}.</li>",
        "<li><b>Calibration</b>: 10 equal-width bins; the probability column when present, "
        "else the logistic of the score (uncalibrated).</li>",
        "</ul>",
    ]


def _provenance(evaluation: Evaluation) -> list[str]:
    lines = [
        _heading("provenance"),
        "<p>The config and model identity behind each predictions folder (its run.json), "
        "and the evaluation's settings.</p>",
        "<details><summary>evaluation settings</summary>"
        f"<pre>{_esc(json.dumps(evaluation.settings, indent=2, sort_keys=True))}</pre></details>",
    ]
    for run in evaluation.runs:
        record = run["run"]
        what = ", ".join(str(record[k]) for k in ("command", "model", "arm") if record.get(k))
        lines.append(
            f"<details><summary>{_esc(run['path'])}{' — ' + _esc(what) if what else ''}</summary>"
            f"<pre>{_esc(json.dumps(record, indent=2, sort_keys=True))}</pre></details>"
        )
    return lines


def render_html(evaluation: Evaluation, figures: dict[str, bytes], examples: list[dict] = ()) -> str:
    """The report page as one HTML string with the figures (and saliency ``examples`` of
    :func:`saliency_examples`) inlined."""
    level = int(round(100 * evaluation.settings.get("level", 0.95)))
    learning = [_image(n, data) for n, data in figures.items() if n.startswith("learning_curve_")]
    sections = [
        *_summary(evaluation, level),
        *_cohort(evaluation),
        *_metrics(evaluation, level),
        *_figure_section(
            "roc",
            figures,
            "roc_",
            "<p>ROC curves at the largest label budget, averaged over seeds (mean "
            "sensitivity at each false-positive rate).</p>",
            "No estimable row to draw.",
        ),
        *_figure_section(
            "label-efficiency",
            figures,
            "label_efficiency_",
            "<p>AUROC against the number of labelled scans the detector was trained on (log scale), one panel "
            f"per system: its line with the {level}% CI band, the other systems in grey behind it; the dotted "
            f"line is chance; the dashed line, where there is one, the supervised ceiling ({_esc(CEILING_LABEL)}).</p>",
            "Only one label budget was evaluated: no curve to draw.",
        ),
        *_operating_points(evaluation, level),
        *_calibration(evaluation, figures),
        *_id_vs_ood(evaluation),
        *_comparisons(evaluation, level),
        *_examples(list(examples)),
        *([_heading("learning-curves"), *learning] if learning else []),
        *_methods(evaluation, level),
        *_provenance(evaluation),
    ]
    # The contents list the sections on the page: one with nothing to show is left out of both.
    shown = [key for key in SECTIONS if any(line.startswith(f"<h2 id='{key}'>") for line in sections)]
    toc = "".join(f"<li><a href='#{key}'>{_esc(SECTIONS[key])}</a></li>" for key in shown)
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fmct report</title>"
            f"<style>{CSS}</style></head><body>",
            "<h1>fmct report</h1>",
            *_synthetic_notice(evaluation),
            f"<p class='muted'>{len(evaluation.runs)} predictions folder(s); "
            f"{level}% CIs from a patient-level bootstrap. "
            "ID: in-distribution test split; OOD: test scans of held-out sites.</p>",
            f"<nav class='toc'><b>Contents</b><ol>{toc}</ol></nav>",
            *sections,
            "</body></html>",
        ]
    )


def _synthetic_notice(evaluation: Evaluation) -> list[str]:
    """A banner when any evaluated cohort was drawn by ``fmct synth`` (its run.json says ``synthetic``)."""
    synthetic = [run["path"] for run in evaluation.runs if run.get("run", {}).get("synthetic")]
    if not synthetic:
        return []
    return [
        "<p class='note'><b>Synthetic data, not for clinical use.</b> The scans behind "
        f"{len(synthetic)} of {len(evaluation.runs)} predictions folder(s) are <code>fmct synth</code> phantoms: "
        "these figures show the pipeline at work, not how a model does on real CT.</p>"
    ]
