"""One self-contained HTML report of evaluated predictions (``fmct report``).

Sections (each an ``<h2 id=...>``): ``summary`` (whether the pretrained arms clear each floor of
:data:`fmct.eval.evaluate.FLOORS`, random-init and hu-histogram, or that a floor is missing; then what
pretraining buys: pretrained vs scratch twins, when both arms are present), ``roc`` (ROC curves per
finding at the largest label budget, ID and OOD side by side, averaged over seeds), ``label-efficiency`` (AUROC vs label fraction with 95% CI bands,
one line per model and arm), ``id-vs-ood`` (AUROC in- and out-of-distribution with CIs and the drop),
``comparisons`` (paired AUROC differences with bootstrap CI and p-values), ``metrics`` (every metric
with its CI) and ``provenance`` (the run.json of every predictions folder behind the numbers).
The figures are embedded as base64 PNGs, so the page opens alone; they are also written as PNG files
into ``<report name>_figures/`` beside the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from fmct import hub  # noqa: E402
from fmct.eval.evaluate import FLOORS, Evaluation, arm_effects, evaluate, pretraining_effects, read_evaluation  # noqa: E402
from fmct.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from fmct.errors import InputError

SECTIONS = ("summary", "learning-curves", "roc", "label-efficiency", "id-vs-ood", "comparisons", "metrics", "provenance")


def load_evaluation(folders: list[str | os.PathLike], n_bootstrap: int = 1000, seed: int = 0) -> Evaluation:
    """Merge evaluation folders (holding metrics.json) and evaluate predictions folders (holding predictions.csv) together."""
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
    return Evaluation(
        metrics=[row for e in evaluated for row in e.metrics],
        comparisons=[row for e in evaluated for row in e.comparisons],
        roc=[row for e in evaluated for row in e.roc],
        runs=[run for e in evaluated for run in e.runs],
        settings=evaluated[0].settings,
    )


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
    figures = _figures(evaluation)
    for spec in pretraining:
        log = hub.training_log(spec)
        figures[f"learning_curve_{Path(str(spec)).name}"] = _png(learning_curve_figure(read_training_log(log), str(spec)))
    figure_dir = out.with_name(out.stem + "_figures")
    for name, png in figures.items():
        atomic_write_bytes(figure_dir / f"{name}.png", png)
    atomic_write_text(out, render_html(evaluation, figures))
    return out


# --------------------------------------------------------------------------------------- figures
def _system(row: dict) -> str:
    return f"{row['model']} ({row['arm']})" if row.get("arm") else row["model"]


def _fraction(row: dict) -> float | None:
    try:
        return float(row["label_fraction"]) if not row.get("shots") else None
    except (TypeError, ValueError):
        return None


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _largest_budget(rows: list[dict]) -> tuple[str, str]:
    budgets = {(r["label_fraction"], r["shots"]) for r in rows}
    fractions = [b for b in budgets if not b[1]]
    if fractions:
        return max(fractions, key=lambda b: float(b[0]))
    return max(budgets, key=lambda b: float(b[1]))


def _figures(evaluation: Evaluation) -> dict[str, bytes]:
    figures = {}
    for finding in sorted({r["finding"] for r in evaluation.metrics}):
        # A group without positives (or negatives) has no AUROC: nothing to draw for it.
        rows = [r for r in evaluation.metrics if r["finding"] == finding and not math.isnan(_float(r["auroc"]))]
        groups = [g for g in ("ID", "OOD") if any(r["group"] == g for r in rows)]
        if not groups:
            continue
        fraction, shots = _largest_budget(rows)
        figure, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False)
        for ax, group in zip(axes[0], groups):
            curves: dict[str, list[tuple[float, float]]] = {}
            for point in evaluation.roc:
                if (point["finding"], point["group"], point["label_fraction"], point["shots"]) == (finding, group, fraction, shots):
                    curves.setdefault(_system(point), []).append((point["fpr"], point["tpr"]))
            aucs = {_system(r): r["auroc"] for r in rows if r["group"] == group and (r["label_fraction"], r["shots"]) == (fraction, shots)}
            for system, points in sorted(curves.items()):
                fpr, tpr = zip(*sorted(points))
                ax.step(fpr, tpr, where="post", label=f"{system}: AUROC {_number(aucs.get(system))}")
            ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
            budget = f"{shots} shots" if shots else f"label fraction {fraction}"
            ax.set(title=f"{finding}, {group} ({budget})", xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
            ax.legend(fontsize=7, loc="lower right")
        figures[f"roc_{finding}"] = _png(figure)

        by_fraction = [r for r in rows if _fraction(r) is not None]
        if len({r["label_fraction"] for r in by_fraction}) > 1:
            figure, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False, sharey=True)
            for ax, group in zip(axes[0], groups):
                for system in sorted({_system(r) for r in by_fraction}):
                    points = sorted((_fraction(r), r) for r in by_fraction if r["group"] == group and _system(r) == system)
                    if not points:
                        continue
                    x = [p[0] for p in points]
                    ax.plot(x, [_float(p[1]["auroc"]) for p in points], marker="o", label=system)
                    ax.fill_between(x, [_float(p[1]["auroc_lo"]) for p in points], [_float(p[1]["auroc_hi"]) for p in points], alpha=0.2)
                ax.set_xscale("log")
                ax.axhline(0.5, color="0.7", linestyle=":", linewidth=1)
                ax.set(title=f"{finding}, {group}", xlabel="label fraction (log scale)", ylabel="AUROC (95% CI)")
                ax.legend(fontsize=7, loc="lower right")
            figures[f"label_efficiency_{finding}"] = _png(figure)
    return figures


# ------------------------------------------------------------------------------------------ HTML
def _float(value) -> float:
    return float("nan") if value is None or value == "" else float(value)


def _number(value, digits: int = 3) -> str:
    value = _float(value)
    return "n/a" if value != value else f"{value:.{digits}f}"


def _with_ci(row: dict, name: str) -> str:
    return f"{_number(row.get(name))} [{_number(row.get(name + '_lo'))}, {_number(row.get(name + '_hi'))}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'


def _where(e: dict) -> str:
    """Where an effect of :func:`fmct.eval.evaluate.arm_effects` was measured, and its AUROC difference [CI], as HTML."""
    return html.escape(f"{e['model']}, {e['finding']}, {e['group']}, labels {e['budget']} "
                       f"({e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}])")


def _summary(evaluation: Evaluation, level: int) -> list[str]:
    """The report's first section: whether the pretrained arms clear each floor, then what pretraining buys."""
    arms = {row["arm"] for row in evaluation.metrics}
    lines = ["<h2 id='summary'>Summary: pretrained vs the floors and vs scratch</h2>"]
    for floor, what in FLOORS.items():
        lines.append(_floor_verdict(evaluation.comparisons, floor, what, arms, level))
    return lines + _pretraining_summary(evaluation.comparisons, level)


def _floor_verdict(comparisons: list[dict], floor: str, what: str, arms: set[str], level: int) -> str:
    """One paragraph: do the pretrained arms clear ``floor`` (AUROC difference with its paired CI above 0)?"""
    floor_name, what = f"the {html.escape(floor)} floor", html.escape(what)
    if "pretrained" not in arms:
        return f"<p>No pretrained arm in this evaluation: nothing to check against {floor_name} ({what}).</p>"
    if floor not in arms:
        return f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): it is not in this evaluation.</p>"
    effects = arm_effects(comparisons, floor)
    if not effects:
        return (f"<p><b>No pretrained arm is checked against {floor_name}</b> ({what}): they never scored the same "
                "scans at the same label budget.</p>")
    cleared = [e for e in effects if e["low"] > 0]
    below = [_where(e) for e in effects if e["high"] < 0]
    counted = (f"AUROC difference pretrained - {html.escape(floor)} with its {level}% paired-bootstrap CI above 0 at "
               f"{len(cleared)} of {len(effects)} comparisons (finding x site group x label budget)")
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

    better = [_where(e) for e in effects if e["low"] > 0]
    worse = [_where(e) for e in effects if e["high"] < 0]
    lines = ["<h3>Pretrained vs scratch</h3>",
             f"<p>{len(effects)} paired comparisons of a pretrained model with the same architecture trained from scratch "
             f"(AUROC difference pretrained - scratch, {level}% paired-bootstrap CI).</p>"]
    lines.append(
        "<p>Pretraining is significantly better at: " + "; ".join(better) + ".</p>" if better
        else "<p><b>At no finding, label budget or site group is the pretrained model significantly better than "
             "scratch in this evaluation.</b></p>"
    )
    if worse:
        lines.append("<p>Scratch is significantly better at: " + "; ".join(worse) + ".</p>")
    return lines


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """The lines of a pretraining log.jsonl as dicts (a torn last line is left out)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def learning_curve_figure(records: list[dict], title: str):
    """Three panels by step: the loss terms; the teacher's head-output cosine between scans (near 1 for a
    collapsed DINO head) and its entropy; the online validation k-NN and linear AUROC per finding (left
    axis) and RankMe (right axis)."""
    figure, (losses, teacher, online) = plt.subplots(1, 3, figsize=(17, 4.2))
    figure.subplots_adjust(wspace=0.45)  # room for the twin axes' labels between the panels

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "mae_loss"):
        steps, values = series(key)
        if steps:
            losses.plot(steps, values, label=key)
    losses.set(title=f"{title}: losses", xlabel="step")
    steps, values = series("teacher_cosine")
    if steps:
        teacher.plot(steps, values, label="head-output cosine between scans")
    teacher.set(title="DINO teacher", xlabel="step", ylabel="cosine (near 1: collapsed)", ylim=(0, 1.05))
    steps, values = series("teacher_entropy")
    if steps:
        entropy_axis = teacher.twinx()
        entropy_axis.plot(steps, values, color="tab:orange", label="teacher entropy (nats, at most ln K)")
        entropy_axis.set_ylabel("entropy (nats)")
        entropy_axis.legend(fontsize=7, loc="upper right")
    for key in sorted({k for r in records for k in r if k.startswith("online_") and "auroc" in k}):
        steps, values = series(key)
        online.plot(steps, values, marker="o", markersize=3, label=key.removeprefix("online_").replace("_auroc", ""))
    online.axhline(0.5, color="0.7", linestyle=":", linewidth=1)
    online.set(title="online validation AUROC (step 0: random init)", xlabel="step", ylabel="AUROC")
    steps, values = series("online_rankme")
    if steps:
        rank_axis = online.twinx()
        rank_axis.plot(steps, values, color="black", linestyle="--", label="RankMe")
        rank_axis.set_ylabel("RankMe (effective rank)")
        rank_axis.legend(fontsize=7, loc="upper right")
    for ax in (losses, teacher, online):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    return figure


def render_html(evaluation: Evaluation, figures: dict[str, bytes]) -> str:
    """The report page as one HTML string with the figures inlined."""
    settings = evaluation.settings
    level = int(round(100 * settings.get("level", 0.95)))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fmct report</title><style>",
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}figure{display:inline-block;margin:4px}"
        "pre{background:#f4f4f4;padding:6px;overflow-x:auto;font-size:12px}",
        "</style></head><body><h1>fmct report</h1>",
        f"<p>{level}% CIs: patient-level bootstrap, {settings.get('n_bootstrap')} resamples (seed {settings.get('seed')}); "
        "metrics computed per training seed, then averaged over seeds. ID: in-distribution test split; "
        "OOD: test scans of held-out sites.</p>",
        *_summary(evaluation, level),
        "<h2 id='learning-curves'>Pretraining learning curves</h2>",
        *([_image(n, png) for n, png in figures.items() if n.startswith("learning_curve_")]
          or ["<p>No pretraining log was given (fmct report --pretraining RUN|MODEL).</p>"]),
        "<h2 id='roc'>ROC curves per finding</h2>",
        *[_image(n, png) for n, png in figures.items() if n.startswith("roc_")],
        "<h2 id='label-efficiency'>Label efficiency</h2>",
    ]
    efficiency = [_image(n, png) for n, png in figures.items() if n.startswith("label_efficiency_")]
    parts += efficiency or ["<p>Only one label fraction was evaluated: no curve to draw.</p>"]

    parts.append("<h2 id='id-vs-ood'>In-distribution vs out-of-distribution (AUROC)</h2>")
    paired: dict[tuple, dict] = {}
    for row in evaluation.metrics:
        key = (_system(row), row["finding"], row["budget"])
        paired.setdefault(key, {})[row["group"]] = row
    table_rows = []
    for (system, finding, budget), by_group in paired.items():
        in_d, out_d = by_group.get("ID"), by_group.get("OOD")
        drop = _number(_float(out_d["auroc"]) - _float(in_d["auroc"])) if in_d and out_d else "n/a"
        table_rows.append([
            system, finding, budget,
            _with_ci(in_d, "auroc") if in_d else "n/a", in_d["sites"] if in_d else "",
            _with_ci(out_d, "auroc") if out_d else "n/a", out_d["sites"] if out_d else "", drop,
        ])
    parts.append(_table(["model (arm)", "finding", "label budget", "AUROC ID", "ID sites", "AUROC OOD", "OOD sites", "OOD - ID"], table_rows))

    parts.append("<h2 id='comparisons'>Paired comparisons (same scans)</h2>")
    parts.append(_table(
        ["finding", "group", "label budget", "a", "b", "scans", "AUROC a", "AUROC b", f"a - b [{level}% CI]", "p (bootstrap)", "p (DeLong)"],
        [[
            c["finding"], c["group"], c["budget"], f"{c['model_a']} ({c['arm_a']})", f"{c['model_b']} ({c['arm_b']})",
            c["n_scans"], _number(c["auroc_a"]), _number(c["auroc_b"]), _with_ci(c, "auroc_diff"),
            _number(c["p_bootstrap"], 4), _number(c["p_delong"], 4),
        ] for c in evaluation.comparisons],
    ))

    parts.append("<h2 id='metrics'>All metrics</h2>")
    parts.append(_table(
        ["model (arm)", "finding", "label budget", "group", "scans", "patients", "pos", "neg", "seeds",
         "AUROC", "AUPRC", "sens @ 90% spec", "sens @ 95% spec", "AUROC sd over seeds"],
        [[
            _system(r), r["finding"], r["budget"], r["group"], r["n_scans"], r["n_patients"], r["n_pos"], r["n_neg"],
            r["n_seeds"], _with_ci(r, "auroc"), _with_ci(r, "auprc"), _with_ci(r, "sens_at_spec90"),
            _with_ci(r, "sens_at_spec95"), _number(r["auroc_seed_sd"]),
        ] for r in evaluation.metrics],
    ))

    parts.append("<h2 id='provenance'>Configs and model identities</h2>")
    for run in evaluation.runs:
        parts.append(f"<h3>{html.escape(run['path'])}</h3><pre>{html.escape(json.dumps(run['run'], indent=2, sort_keys=True))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
